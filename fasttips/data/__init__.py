"""Data: shards, embedded demo data, tokenizer, multi-crop, iBOT masks, DALI and PyTorch loaders."""
