# CUDA backend: placeholder until src/cuda lands (owned by the build/CUDA helper).
set(FASTATTN_HAS_CUDA OFF)
