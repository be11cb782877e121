// pointers[o * batch + i] = the address of matrix i of operand o (B, A, C) of a pointer-array GEMM:
// base_o + sum over the batch axes of index * stride. Computed on the device, so that a CUDA graph can
// record it (no host-to-device copy). Up to 4 batch axes; dims and strides come as scalars for the same reason.
// Compiled by npgpt/fast/cuda/cublas.py with NVRTC (-DTHREADS_PER_BLOCK from kernels.py).

extern "C" __global__ void matrix_pointers(
        unsigned long long base_b, unsigned long long base_a, unsigned long long base_c, long long batch,
        long long itemsize, long long n0, long long n1, long long n2, long long n3,
        long long b0, long long b1, long long b2, long long b3, long long a0, long long a1, long long a2,
        long long a3, long long c0, long long c1, long long c2, long long c3, unsigned long long* pointers) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= 3 * batch) return;
    const long long o = i / batch;
    long long rest = i % batch, offset = 0;
    const long long dims[4] = {n0, n1, n2, n3};
    const long long strides[3][4] = {{b0, b1, b2, b3}, {a0, a1, a2, a3}, {c0, c1, c2, c3}};
    for (int axis = 3; axis >= 0; --axis) {
        offset += (rest % dims[axis]) * strides[o][axis];
        rest /= dims[axis];
    }
    pointers[i] = (o == 0 ? base_b : o == 1 ? base_a : base_c) + (unsigned long long)(offset * itemsize);
}
