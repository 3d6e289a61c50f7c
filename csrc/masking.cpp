// fasttips._native: the iBOT block-mask generator (the C++ twin of fasttips/data/masks.py).
//
// block_masks(height, width, counts, min_patches, max_patches, min_aspect, seed) -> bytes
//   len(counts) masks of height*width bytes (1 = masked). Image i draws from its own splitmix64
//   stream seeded with image_seed(seed, i), exactly as the Python twin does, so both return the
//   same bytes for the same arguments. Plain CPython API: no numpy, torch or pybind11 at build time.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

constexpr int kMaxTries = 10;     // placements tried per block (DINOv2's value)
constexpr int kFinishTries = 30;  // per finishing block: fitting a leftover of 1-3 patches needs more tries

struct SplitMix64 {
    uint64_t state;
    explicit SplitMix64(uint64_t seed) : state(seed) {}
    uint64_t next() {
        state += 0x9E3779B97F4A7C15ULL;
        uint64_t z = state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    double uniform(double lo, double hi) {
        return lo + (hi - lo) * (static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0));
    }
    // Uniform integer in [lo, hi] (inclusive).
    int64_t randint(int64_t lo, int64_t hi) {
        return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo + 1));
    }
};

uint64_t image_seed(uint64_t seed, uint64_t index) {
    return seed * 0x9E3779B97F4A7C15ULL + index * 0xD1B54A32D192ED03ULL + 1ULL;
}

// True if the rectangle overlaps the mask or shares an edge with a masked patch.
bool touches_mask(const uint8_t* mask, int height, int width, int top, int left, int h, int w) {
    for (int i = std::max(0, top - 1); i < std::min(height, top + h + 1); ++i) {
        const bool row_outside = i < top || i >= top + h;
        for (int j = std::max(0, left - 1); j < std::min(width, left + w + 1); ++j) {
            if (row_outside && (j < left || j >= left + w)) continue;  // a corner does not join a block
            if (mask[i * width + j]) return true;
        }
    }
    return false;
}

// One block: up to `tries` placements; returns the number of newly masked patches (0 = none fit).
int place_block(SplitMix64& rng, uint8_t* mask, int height, int width, double area_lo, double area_hi,
                int budget, int tries, double log_lo, double log_hi) {
    for (int attempt = 0; attempt < tries; ++attempt) {
        const double area = rng.uniform(area_lo, area_hi);
        const double aspect = std::exp(rng.uniform(log_lo, log_hi));
        const int h = static_cast<int>(std::sqrt(area * aspect) + 0.5);
        const int w = static_cast<int>(std::sqrt(area / aspect) + 0.5);
        if (h < 1 || w < 1 || h > height || w > width) continue;
        const int top = static_cast<int>(rng.randint(0, height - h));
        const int left = static_cast<int>(rng.randint(0, width - w));
        int already = 0;
        for (int i = 0; i < h; ++i)
            for (int j = 0; j < w; ++j) already += mask[(top + i) * width + left + j];
        const int fresh = h * w - already;
        if (fresh <= 0 || fresh > budget) continue;  // never overshoot the target; overlap is fine
        if (h * w == 1 && !touches_mask(mask, height, width, top, left, 1, 1)) continue;  // no isolated patch
        for (int i = 0; i < h; ++i)
            for (int j = 0; j < w; ++j) mask[(top + i) * width + left + j] = 1;
        return fresh;
    }
    return 0;
}

bool has_masked_neighbour(const uint8_t* mask, int height, int width, int k) {
    const int i = k / width, j = k % width;
    return (j > 0 && mask[k - 1]) || (j + 1 < width && mask[k + 1]) || (i > 0 && mask[k - width]) ||
           (i + 1 < height && mask[k + width]);
}

// The rare shortfall: mask random unmasked neighbours of the mask (any patch if it is empty).
void grow_at_edge(SplitMix64& rng, uint8_t* mask, int height, int width, int missing) {
    const int n = height * width;
    std::vector<int> edge;
    for (int added = 0; added < missing; ++added) {
        edge.clear();
        for (int k = 0; k < n; ++k)
            if (!mask[k] && has_masked_neighbour(mask, height, width, k)) edge.push_back(k);
        if (edge.empty())
            for (int k = 0; k < n; ++k)
                if (!mask[k]) edge.push_back(k);
        const int64_t pick = rng.randint(0, static_cast<int64_t>(edge.size()) - 1);
        mask[edge[static_cast<size_t>(pick)]] = 1;
    }
}

void one_mask(SplitMix64& rng, uint8_t* mask, int height, int width, int count, int min_patches,
              int max_patches, double log_lo, double log_hi) {
    int done = 0;
    while (done < count) {
        const int budget = std::min(count - done, max_patches);
        const int delta =
            budget >= min_patches
                ? place_block(rng, mask, height, width, min_patches, budget, budget, kMaxTries, log_lo, log_hi)
                // finishing block: may overlap the mask by up to min_patches - budget
                : place_block(rng, mask, height, width, budget, min_patches, budget, kFinishTries, log_lo,
                              log_hi);
        if (delta == 0) break;
        done += delta;
    }
    if (done < count) grow_at_edge(rng, mask, height, width, count - done);
}

PyObject* block_masks(PyObject*, PyObject* args) {
    int height, width, min_patches, max_patches;
    PyObject* counts_obj;
    double min_aspect;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "iiOiidK", &height, &width, &counts_obj, &min_patches, &max_patches,
                          &min_aspect, &seed))
        return nullptr;
    if (height < 1 || width < 1 || min_patches < 1 || max_patches < min_patches || !(min_aspect > 0.0) ||
        min_aspect > 1.0) {
        PyErr_SetString(PyExc_ValueError,
                        "block_masks: need height, width, min_patches >= 1, max_patches >= min_patches "
                        "and 0 < min_aspect <= 1");
        return nullptr;
    }
    PyObject* seq = PySequence_Fast(counts_obj, "block_masks: counts must be a sequence of ints");
    if (!seq) return nullptr;
    const Py_ssize_t n_images = PySequence_Fast_GET_SIZE(seq);
    const int n = height * width;
    std::vector<int> counts(static_cast<size_t>(n_images));
    for (Py_ssize_t i = 0; i < n_images; ++i) {
        const long c = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (c == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return nullptr;
        }
        if (c < 0 || c > n) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError,
                            ("block_masks: each count must be in [0, " + std::to_string(n) + "]").c_str());
            return nullptr;
        }
        counts[static_cast<size_t>(i)] = static_cast<int>(c);
    }
    Py_DECREF(seq);

    PyObject* out = PyBytes_FromStringAndSize(nullptr, n_images * static_cast<Py_ssize_t>(n));
    if (!out) return nullptr;
    auto* buf = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out));
    std::fill(buf, buf + n_images * static_cast<Py_ssize_t>(n), uint8_t{0});
    const double log_lo = std::log(min_aspect), log_hi = std::log(1.0 / min_aspect);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n_images; ++i) {
        SplitMix64 rng(image_seed(seed, static_cast<uint64_t>(i)));
        one_mask(rng, buf + i * n, height, width, counts[static_cast<size_t>(i)], min_patches, max_patches,
                 log_lo, log_hi);
    }
    Py_END_ALLOW_THREADS
    return out;
}

PyMethodDef kMethods[] = {
    {"block_masks", block_masks, METH_VARARGS,
     "block_masks(height, width, counts, min_patches, max_patches, min_aspect, seed) -> bytes\n"
     "iBOT block masks, one height*width run of 0/1 bytes per count (see fasttips.data.masks)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "fasttips._native",
                       "Native helpers for fasttips (each has a pure-Python twin).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&kModule); }
