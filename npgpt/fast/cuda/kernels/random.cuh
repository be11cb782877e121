#pragma once
// splitmix64 of (seed, element index): counter-based random bits, so a backward pass regenerates the
// forward pass's dropout mask exactly and no mask is ever stored
__device__ unsigned int dropout_bits(unsigned long long seed, unsigned long long index) {
    unsigned long long z = seed + (index + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return (unsigned int)(z >> 32);
}

// The seed a kernel hashes with: its own (drawn on the host when the op ran) moved along by the device's
// replay counter, which stays 0 in eager training and counts the replays of a recorded CUDA graph, whose
// host seeds are frozen into it (npgpt/fast/cuda/graph.py). So each replay draws fresh dropout masks.
__device__ unsigned long long replay_seed(unsigned long long seed, const unsigned long long* replay) {
    return seed + replay[0] * 0xD1B54A32D192ED03ULL;
}
