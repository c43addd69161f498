// fastattn: typed errors. Every op validates all arguments before any work and throws one of
// these with a message that names the argument, what was expected and what came.
#pragma once

#include <stdexcept>
#include <string>

namespace fastattn {

/// Base of all fastattn errors.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A shape, size, stride or value is wrong (Python: ValueError).
class ValueError : public Error {
 public:
  using Error::Error;
};

/// An element type is wrong (Python: TypeError).
class TypeError : public Error {
 public:
  using Error::Error;
};

/// The tensors live on a device the op cannot use, or on different devices (Python: ValueError).
class DeviceError : public ValueError {
 public:
  using ValueError::ValueError;
};

/// A valid request this build or backend does not serve, e.g. a CUDA tensor in a build without
/// kernels for it (Python: NotImplementedError).
class NotSupportedError : public Error {
 public:
  using Error::Error;
};

}  // namespace fastattn
