"""Fixtures of the benchmark-suite tests: a tiny real fasttips model with its tokenizer."""
import pytest
import torch

from suite_helpers import TINY


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer, cfg): a randomly initialised 1-block fasttips model on 28-px inputs."""
    from fasttips import config as config_mod
    from fasttips.data.tokenizer import Tokenizer
    from fasttips.models import build_model
    torch.manual_seed(0)
    cfg = config_mod.load(None, TINY)
    model = build_model(cfg, device="cpu").eval()
    tok = Tokenizer.train(["a photo of a red circle on grass", "the blue square under the sky",
                           "itap of a bad origami in a video game"] * 20, vocab_size=40, max_len=cfg.text.max_len)
    return model, tok, cfg


