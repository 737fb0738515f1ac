"""Small helpers over TVM Relax modules, shared by the rewrites (int8_kernels, cpu_kernels, gpu_schedules, ...)."""
from __future__ import annotations


def mutate_functions(mutator, mod, skip_primitive: bool = False):
    """Every Relax function of `mod` rewritten by `mutator` (a relax.PyExprMutator built on `mod`), and the module its
    builder then holds. With skip_primitive, functions that FuseOps made (attribute "Primitive") are left as they
    are."""
    from tvm import relax

    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function) and not (skip_primitive and "Primitive" in (func.attrs or {})):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()

