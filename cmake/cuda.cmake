# CUDA backend.
#
# When FASTATTN_CUDA is ON and a CUDA compiler is found, compiles src/cuda/ into an object
# library whose objects go into the fastattn static library, defines FASTATTN_WITH_CUDA for
# fastattn's own sources and sets FASTATTN_HAS_CUDA. Otherwise the build is CPU-only and
# FASTATTN_HAS_CUDA is OFF.
#
# Knobs:
#   FASTATTN_CUDA_ARCHS   CMAKE_CUDA_ARCHITECTURES list, default "80-real;90a-real"
#                         (sm_80 tensor-core path; sm_90a so wgmma/setmaxnreg can be used later).
#   FASTATTN_CUTLASS_DIR  a directory holding cute/tensor.hpp and cutlass/cutlass.h (cache variable
#                         or environment variable). When unset, the include directory of the pinned
#                         PyPI package nvidia-cutlass (cutlass_library/source/include) is used.

set(FASTATTN_HAS_CUDA OFF)
set(FASTATTN_CUTLASS_PIN "4.2.0.0")  # the one nvidia-cutlass version we build and test with

if(NOT FASTATTN_CUDA)
  message(STATUS "fastattn: CUDA backend disabled (FASTATTN_CUDA=OFF)")
  return()
endif()

# nvcc often lives outside PATH (/usr/local/cuda/bin); let check_language see it there.
if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND EXISTS "/usr/local/cuda/bin/nvcc")
  find_program(_fastattn_nvcc nvcc)
  if(NOT _fastattn_nvcc)
    set(CMAKE_CUDA_COMPILER "/usr/local/cuda/bin/nvcc")
  endif()
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  message(STATUS "fastattn: no CUDA compiler found, building the CPU backend only")
  return()
endif()

# ---- architectures (must be set before enable_language picks a default) ------------------------
set(FASTATTN_CUDA_ARCHS "80-real;90a-real" CACHE STRING
    "CUDA architectures for the fastattn kernels (CMAKE_CUDA_ARCHITECTURES syntax)")
set(CMAKE_CUDA_ARCHITECTURES "${FASTATTN_CUDA_ARCHS}")
enable_language(CUDA)

if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.0)
  message(FATAL_ERROR "fastattn: the CUDA backend needs CUDA >= 12.0 (sm_90a); found "
                      "${CMAKE_CUDA_COMPILER_VERSION}. Configure with -DFASTATTN_CUDA=OFF to skip it.")
endif()

find_package(CUDAToolkit REQUIRED)

# ---- CUTLASS / CuTe headers --------------------------------------------------------------------
set(_fastattn_cutlass_doc
    "Directory holding the CUTLASS/CuTe headers (cute/tensor.hpp); empty = use the nvidia-cutlass pip package")
set(FASTATTN_CUTLASS_DIR "$ENV{FASTATTN_CUTLASS_DIR}" CACHE PATH "${_fastattn_cutlass_doc}")
# An empty entry cached by an earlier configure (one that failed for want of the headers) must not
# hide the environment variable set since, as the error below tells the user to do.
if(NOT FASTATTN_CUTLASS_DIR AND NOT "$ENV{FASTATTN_CUTLASS_DIR}" STREQUAL "")
  set(FASTATTN_CUTLASS_DIR "$ENV{FASTATTN_CUTLASS_DIR}" CACHE PATH "${_fastattn_cutlass_doc}" FORCE)
endif()

function(_fastattn_cutlass_from_python out_var)
  # The Python interpreter to ask: the one scikit-build-core / FindPython chose, else python3.
  set(_candidates)
  foreach(_v Python_EXECUTABLE Python3_EXECUTABLE PYTHON_EXECUTABLE)
    if(${_v})
      list(APPEND _candidates "${${_v}}")
    endif()
  endforeach()
  find_program(_fastattn_py3 NAMES python3 python)
  if(_fastattn_py3)
    list(APPEND _candidates "${_fastattn_py3}")
  endif()
  set(_script "import os, cutlass_library; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")
  # Each interpreter is asked twice: as the build runs it, then isolated (-I: no PYTHONPATH), which
  # sees the interpreter's own site-packages when pip's build isolation hides them.
  foreach(_py IN LISTS _candidates)
   foreach(_mode "" "-I")
    execute_process(COMMAND "${_py}" ${_mode} -c "${_script}"
                    RESULT_VARIABLE _rc OUTPUT_VARIABLE _dir ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(_rc EQUAL 0 AND EXISTS "${_dir}/cute/tensor.hpp")
      execute_process(COMMAND "${_py}" ${_mode} -c "import importlib.metadata as m; print(m.version('nvidia-cutlass'))"
                      RESULT_VARIABLE _rc2 OUTPUT_VARIABLE _ver ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
      if(NOT _ver STREQUAL FASTATTN_CUTLASS_PIN)
        message(WARNING "fastattn: nvidia-cutlass ${_ver} found through ${_py}; "
                        "fastattn is built and tested with ${FASTATTN_CUTLASS_PIN}")
      endif()
      set(${out_var} "${_dir}" PARENT_SCOPE)
      return()
    endif()
   endforeach()
  endforeach()
  set(${out_var} "" PARENT_SCOPE)
endfunction()

if(FASTATTN_CUTLASS_DIR)
  set(_fastattn_cutlass_include "${FASTATTN_CUTLASS_DIR}")
  set(_fastattn_cutlass_origin "FASTATTN_CUTLASS_DIR")
else()
  _fastattn_cutlass_from_python(_fastattn_cutlass_include)
  set(_fastattn_cutlass_origin "the nvidia-cutlass Python package")
endif()
if(NOT _fastattn_cutlass_include OR NOT EXISTS "${_fastattn_cutlass_include}/cute/tensor.hpp"
   OR NOT EXISTS "${_fastattn_cutlass_include}/cutlass/cutlass.h")
  message(FATAL_ERROR
    "fastattn: the CUDA backend needs the CUTLASS/CuTe headers and did not find them "
    "(looked in '${_fastattn_cutlass_include}' from ${_fastattn_cutlass_origin}).\n"
    "Either  pip install nvidia-cutlass==${FASTATTN_CUTLASS_PIN}  (for the Python used by the build),\n"
    "or pass -DFASTATTN_CUTLASS_DIR=<dir containing cute/tensor.hpp> (or set the environment variable),\n"
    "or build without CUDA: -DFASTATTN_CUDA=OFF (pip: FASTATTN_CUDA=0).")
endif()
message(STATUS "fastattn: CUTLASS/CuTe headers from ${_fastattn_cutlass_origin}: ${_fastattn_cutlass_include}")

# ---- the CUDA sources --------------------------------------------------------------------------
file(GLOB_RECURSE FASTATTN_CUDA_SOURCES CONFIGURE_DEPENDS
     ${CMAKE_CURRENT_SOURCE_DIR}/src/cuda/*.cu ${CMAKE_CURRENT_SOURCE_DIR}/src/cuda/*.cpp)
add_library(fastattn_cuda OBJECT ${FASTATTN_CUDA_SOURCES})
target_include_directories(fastattn_cuda PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/include ${CMAKE_CURRENT_SOURCE_DIR}/src)
# CUTLASS is a private, header-only build dependency: consumers of fastattn never see it.
target_include_directories(fastattn_cuda SYSTEM PRIVATE "${_fastattn_cutlass_include}")
target_compile_definitions(fastattn_cuda PRIVATE FASTATTN_WITH_CUDA)
target_compile_features(fastattn_cuda PRIVATE cxx_std_17 cuda_std_17)
set_target_properties(fastattn_cuda PROPERTIES
  CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON
  CUDA_ARCHITECTURES "${FASTATTN_CUDA_ARCHS}"
  POSITION_INDEPENDENT_CODE ON
  CUDA_SEPARABLE_COMPILATION OFF)  # no relocatable device code: no device-link step for users
target_compile_options(fastattn_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -Xcompiler=-Wall>
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>)
target_link_libraries(fastattn_cuda PRIVATE CUDA::cudart_static)
# Source-line tables in the device code, for ncu's source view (profiling builds only).
option(FASTATTN_CUDA_LINEINFO "Compile CUDA kernels with -lineinfo (for profiling)" OFF)
if(FASTATTN_CUDA_LINEINFO)
  target_compile_options(fastattn_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>)
endif()

# The objects go into libfastattn.a itself, so the installed package has one library.
target_sources(fastattn PRIVATE $<TARGET_OBJECTS:fastattn_cuda>)
target_compile_definitions(fastattn PRIVATE FASTATTN_WITH_CUDA)
# The static CUDA runtime: no libcudart.so needed at run time, and a machine without a driver
# simply reports no device (cudaGetDeviceCount fails) instead of failing to load the library.
target_link_libraries(fastattn PUBLIC CUDA::cudart_static)

set(FASTATTN_HAS_CUDA ON)
list(LENGTH FASTATTN_CUDA_SOURCES _n_cuda_sources)
message(STATUS "fastattn: CUDA backend ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, archs ${FASTATTN_CUDA_ARCHS}, "
               "${_n_cuda_sources} CUDA sources)")
