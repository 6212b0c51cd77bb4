#pragma once
// Registration hub of fastvl._C: an op's source file adds its bindings with FASTVL_REGISTER_OP, so
// adding an op never touches the module definition.
#include <torch/extension.h>

#include <functional>
#include <string>
#include <vector>

namespace fastvl {

using Binder = std::function<void(pybind11::module_&)>;

struct OpRegistry {
  std::vector<std::pair<std::string, Binder>> binders;
  static OpRegistry& get() {
    static OpRegistry registry;
    return registry;
  }
};

struct RegisterOp {
  RegisterOp(const std::string& name, Binder binder) {
    OpRegistry::get().binders.emplace_back(name, std::move(binder));
  }
};

inline void bind_all(pybind11::module_& m) {
  for (auto& [name, binder] : OpRegistry::get().binders) binder(m);
}

inline std::vector<std::string> registered_ops() {
  std::vector<std::string> names;
  for (auto& entry : OpRegistry::get().binders) names.push_back(entry.first);
  return names;
}

}  // namespace fastvl

#define FASTVL_CONCAT_INNER(a, b) a##b
#define FASTVL_CONCAT(a, b) FASTVL_CONCAT_INNER(a, b)
// FASTVL_REGISTER_OP("region_kl_cpu", [](pybind11::module_& m) { m.def(...); });
#define FASTVL_REGISTER_OP(name, binder) \
  static ::fastvl::RegisterOp FASTVL_CONCAT(fastvl_register_, __COUNTER__)(name, binder)
