# CUDA build settings (owned by the CUDA kernels work; see csrc/cuda/README.md).
#
# Included by CMakeLists.txt before find_package(Torch) when torch has CUDA and nvcc was
# found; CMakeLists.txt then calls switch_sae_cuda_target(<target>) once the target
# exists. Architectures are driven by TORCH_CUDA_ARCH_LIST, not CMAKE_CUDA_ARCHITECTURES:
# torch's CMake config ignores the latter and turns the former into -gencode flags
# (pytorch/pytorch #115937), so that is the one knob that works.

# sm_80 (A100) and sm_90 (H100) SASS, plus compute_90 PTX so that newer GPUs can JIT it.
# A user or CI can narrow or widen this with the TORCH_CUDA_ARCH_LIST environment variable.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX")
endif()

# CMake learned nvcc's C++20 flag in 3.26 (older releases stop with "CUDA20 dialect ...
# not supported"); pyproject.toml asks scikit-build-core for such a CMake.
if(CMAKE_VERSION VERSION_LESS 3.26)
  message(FATAL_ERROR "The CUDA kernels need CMake >= 3.26 (this is ${CMAKE_VERSION}); "
                      "`pip install cmake` or set SWITCH_SAE_CUDA=OFF")
endif()
# Host code in .cu files is compiled by the same C++ compiler as the .cpp files, so both
# halves of the extension agree on the C++ ABI and the standard library.
if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER AND NOT DEFINED ENV{CUDAHOSTCXX})
  set(CMAKE_CUDA_HOST_COMPILER "${CMAKE_CXX_COMPILER}")
endif()

enable_language(CUDA)
# enable_language picks a default architecture when it cannot see a GPU; drop it so that
# torch's config does not warn about it and TORCH_CUDA_ARCH_LIST is the only source of
# -gencode flags (the target gets CUDA_ARCHITECTURES OFF in switch_sae_cuda_target).
unset(CMAKE_CUDA_ARCHITECTURES)
unset(CMAKE_CUDA_ARCHITECTURES CACHE)

# torch's config locates the toolkit with the old FindCUDA module, which guesses the root
# from the nvcc on PATH; that guess fails when nvcc is a wrapper script outside the
# toolkit (as /usr/local/bin/nvcc is on our build machines). The compiler CMake has just
# identified knows its own root.
if(NOT CUDA_TOOLKIT_ROOT_DIR)
  set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
endif()

# ATen's headers need C++20 (torch 2.14 enforces it), and CUDA 13's nvcc misparses some
# of them in C++17 mode.
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
# nvcc has no GNU dialect: plain -std=c++20 (host extensions come from the host compiler).
set(CMAKE_CUDA_EXTENSIONS OFF)

# Called by CMakeLists.txt after find_package(Torch) and after <target> is created, before
# it is linked. A macro, not a function, because it edits TORCH_LIBRARIES in the caller.
macro(switch_sae_cuda_target target)
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES OFF)
  target_compile_definitions(${target} PRIVATE SWITCH_SAE_WITH_CUDA=1)
  # Flags for our .cu files (torch's config already adds --expt-relaxed-constexpr and
  # --expt-extended-lambda). -lineinfo keeps source lines for profilers and
  # compute-sanitizer at no runtime cost; -warn-spills makes register spills visible in
  # the build log; the host compiler gets the same warnings as our C++ sources.
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo -Xptxas=-warn-spills -Xcompiler=-Wall,-Wextra,-Wno-unused-parameter>)
  # torch lists libnvrtc among its link libraries, found in the CUDA toolkit. A toolkit
  # without NVRTC (nvcc-only installs, where NVRTC comes with the torch wheel instead)
  # leaves it NOTFOUND; our kernels do not use NVRTC, so drop the entry rather than fail.
  list(FILTER TORCH_LIBRARIES EXCLUDE REGEX "-NOTFOUND$")
endmacro()
