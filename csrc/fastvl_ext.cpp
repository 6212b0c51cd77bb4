// Python bindings of fastvl._C. Each op's sources register their functions in
// fastvl::bind_<op>(module); this file only declares the module and reports what was built.
#include <torch/extension.h>

#include "fastvl_ext.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef FASTVL_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["ops"] = fastvl::registered_ops();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvl C++/CUDA extension";
  m.def("build_info", &build_info, "What this build of fastvl._C contains");
  fastvl::bind_all(m);
}
