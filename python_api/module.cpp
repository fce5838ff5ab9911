// cersa_kernels._cuda: the csrc/ launchers as a Python module. Thin by design: no math here.
// A tensor arrives as a tuple (data_ptr, dtype_code, rows, cols, stride_row, stride_col) (3-D:
// (data_ptr, dtype_code, sizes, strides)), a stream as its integer handle. C++ exceptions become
// Python ones: std::invalid_argument -> ValueError, std::runtime_error (CUDA errors) -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "launchers.h"

// Defined by setup.py; the fallbacks only keep editors and stray builds compiling.
#ifndef CERSA_ARCHS
#define CERSA_ARCHS "unknown"
#endif
#ifndef CERSA_NVCC_VERSION
#define CERSA_NVCC_VERSION "unknown"
#endif
#ifndef CERSA_SOURCE_HASH
#define CERSA_SOURCE_HASH "unknown"
#endif

namespace py = pybind11;

namespace {

using MatrixArg = std::tuple<uintptr_t, int, int64_t, int64_t, int64_t, int64_t>;
using Tensor3Arg = std::tuple<uintptr_t, int, std::array<int64_t, 3>, std::array<int64_t, 3>>;

cersa::DType to_dtype(int code) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(code));
  }
  return static_cast<cersa::DType>(code);
}

cersa::Matrix to_matrix(const MatrixArg& t) {
  const auto& [ptr, code, rows, cols, sr, sc] = t;
  return {reinterpret_cast<void*>(ptr), to_dtype(code), rows, cols, sr, sc};
}

cersa::Tensor3 to_tensor3(const Tensor3Arg& t) {
  const auto& [ptr, code, size, stride] = t;
  return {reinterpret_cast<void*>(ptr), to_dtype(code), {size[0], size[1], size[2]}, {stride[0], stride[1], stride[2]}};
}

cudaStream_t to_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

std::vector<std::string> split_archs(const std::string& archs) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= archs.size()) {
    const size_t end = std::min(archs.find(';', start), archs.size());
    if (end > start) out.push_back(archs.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "CUDA C++ kernels of cersa_kernels (csrc/), called by cersa_kernels.backends.cuda";
  m.attr("FLOAT32") = static_cast<int>(cersa::DType::f32);
  m.attr("FLOAT16") = static_cast<int>(cersa::DType::f16);
  m.attr("BFLOAT16") = static_cast<int>(cersa::DType::bf16);
  m.attr("KERNELS") = py::make_tuple("lowrank_fwd", "lowrank_bwd", "snell_delta");
  m.attr("SNELL_MAX_HEADS") = cersa::kSnellMaxHeads;

  m.def(
      "build_info",
      [] {
        int runtime = 0, driver = 0;
        cudaRuntimeGetVersion(&runtime);  // the statically linked runtime: answers without a driver
        cudaDriverGetVersion(&driver);    // 0 when no driver is installed
        py::dict info;
        info["archs"] = split_archs(CERSA_ARCHS);
        info["nvcc_version"] = CERSA_NVCC_VERSION;
        info["source_hash"] = CERSA_SOURCE_HASH;
        info["cuda_runtime_version"] = runtime;
        info["cuda_driver_version"] = driver;
        return info;
      },
      "Archs compiled for, nvcc version, hash of csrc/ + python_api/, CUDA runtime and driver versions.");

  m.def(
      "lowrank_fwd_workspace_bytes",
      [](const MatrixArg& x, const MatrixArg& V, const MatrixArg& S, const MatrixArg& U) {
        return cersa::lowrank_fwd_workspace_bytes(to_matrix(x), to_matrix(V), to_matrix(S), to_matrix(U));
      },
      py::arg("x"), py::arg("V"), py::arg("S"), py::arg("U"));

  m.def(
      "lowrank_fwd",
      [](const MatrixArg& x, const MatrixArg& V, const MatrixArg& S, const MatrixArg& U,
         const std::optional<MatrixArg>& bias, const MatrixArg& y, const MatrixArg& h, uintptr_t workspace,
         size_t workspace_bytes, uintptr_t stream) {
        std::optional<cersa::Matrix> b;
        if (bias) b = to_matrix(*bias);
        py::gil_scoped_release no_gil;
        cersa::lowrank_fwd(to_matrix(x), to_matrix(V), to_matrix(S), to_matrix(U), b ? &*b : nullptr, to_matrix(y),
                           to_matrix(h), reinterpret_cast<void*>(workspace), workspace_bytes, to_stream(stream));
      },
      py::arg("x"), py::arg("V"), py::arg("S"), py::arg("U"), py::arg("bias"), py::arg("y"), py::arg("h"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "y = (x V)(U S)^T + bias and h = x V, written into y and h.");

  m.def(
      "lowrank_bwd_workspace_bytes",
      [](const MatrixArg& dy, const MatrixArg& h, const MatrixArg& V, const MatrixArg& S, const MatrixArg& U,
         bool need_dx) {
        return cersa::lowrank_bwd_workspace_bytes(to_matrix(dy), to_matrix(h), to_matrix(V), to_matrix(S),
                                                  to_matrix(U), need_dx);
      },
      py::arg("dy"), py::arg("h"), py::arg("V"), py::arg("S"), py::arg("U"), py::arg("need_dx"));

  m.def(
      "lowrank_bwd",
      [](const MatrixArg& dy, const MatrixArg& h, const MatrixArg& V, const MatrixArg& S, const MatrixArg& U,
         const std::optional<MatrixArg>& dx, const MatrixArg& dS, uintptr_t workspace, size_t workspace_bytes,
         uintptr_t stream) {
        std::optional<cersa::Matrix> d;
        if (dx) d = to_matrix(*dx);
        py::gil_scoped_release no_gil;
        cersa::lowrank_bwd(to_matrix(dy), to_matrix(h), to_matrix(V), to_matrix(S), to_matrix(U), d ? &*d : nullptr,
                           to_matrix(dS), reinterpret_cast<void*>(workspace), workspace_bytes, to_stream(stream));
      },
      py::arg("dy"), py::arg("h"), py::arg("V"), py::arg("S"), py::arg("U"), py::arg("dx"), py::arg("dS"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "dS = (dy U)^T h and, unless dx is None, dx = (dy U)(S V^T), written into dS and dx.");

  m.def(
      "snell_delta",
      [](const Tensor3Arg& A, const Tensor3Arg& B, const std::vector<float>& coeffs, float tau, const MatrixArg& out,
         uintptr_t stream) {
        const cersa::Tensor3 a = to_tensor3(A);
        if (static_cast<int64_t>(coeffs.size()) != a.size[0]) {
          throw std::invalid_argument("coeffs must hold one value per head (H=" + std::to_string(a.size[0]) +
                                      "), got " + std::to_string(coeffs.size()));
        }
        py::gil_scoped_release no_gil;
        cersa::snell_delta(a, to_tensor3(B), coeffs.data(), static_cast<int>(coeffs.size()), tau, to_matrix(out),
                           to_stream(stream));
      },
      py::arg("A"), py::arg("B"), py::arg("coeffs"), py::arg("tau"), py::arg("out"), py::arg("stream"),
      "out[i, j] = K|K| where |K| > tau else 0, K[i, j] = sum_h coeffs[h] |B[h, i] - A[h, j]|.");
}
