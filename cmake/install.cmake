# Install rules and the fastattn CMake package (owned by the build/CUDA helper).
