"""What the custom CUDA kernels (utils/cuda_kernels/decode.py, utils/cuda_kernels/sampling.py, utils/cuda_kernels/logprobs.py)
share: where they run, and the full source MLX generates for one, so it can be compiled with NVRTC
on a machine without a GPU."""

import mlx.core as mx

CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float",
              mx.int32: "int32_t", mx.uint32: "uint32_t"}
# MLX's get_type_string, which names a dtype template argument in the kernel's name.
_TYPE_STRINGS = {mx.bfloat16: "bfloat16_t", mx.float16: "float16_t", mx.float32: "float",
                 mx.int32: "int32", mx.uint32: "uint32"}
_MLX_DEFAULT_HEADER = """
#include "mlx/backend/cuda/device/utils.cuh"

#include <cooperative_groups.h>

"""


def available() -> bool:
    """True when MLX runs on its CUDA backend with the GPU as the default device."""
    cuda = getattr(mx, "cuda", None)
    return cuda is not None and cuda.is_available() and mx.default_device().type == mx.DeviceType.gpu


def _template_value(value):
    if isinstance(value, bool):
        return "_t" if value else "_f"
    return f"_{_TYPE_STRINGS[value]}" if isinstance(value, mx.Dtype) else f"_{value}"


def generated_source(kernel_name, header, source, inputs, outputs, template):
    """(name, full source) as mx.fast.cuda_kernel generates them (mlx/backend/cuda/custom_kernel.cpp).

    inputs, outputs: [(name, dtype)]; an input whose `<name>_shape` the source uses gets that Shape
    parameter too. template: [(name, int | bool | dtype)], as passed to the kernel call."""
    name = f"custom_kernel_{kernel_name}" + "".join(_template_value(v) for _, v in template)
    params = []
    for arg, dtype in inputs:
        params.append(f"    const {CUDA_TYPES[dtype]}* {arg},")
        if f"{arg}_shape" in source:
            params.append(f"    const __grid_constant__ Shape {arg}_shape,")
    params += [f"    {CUDA_TYPES[dtype]}* {arg}," for arg, dtype in outputs]
    params[-1] = params[-1][:-1] + ") {"
    constants = ""
    for key, value in template:
        if isinstance(value, bool):
            constants += f"  constexpr bool {key} = {str(value).lower()};\n"
        elif isinstance(value, mx.Dtype):
            constants += f"  using {key} = {CUDA_TYPES[value]};\n"
        else:
            constants += f"  constexpr int {key} = {value};\n"
    if template:
        constants += "\n"
    return name, (_MLX_DEFAULT_HEADER + header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
                  + f"__global__ void {name}(\n" + "\n".join(params) + "\n" + constants + source
                  + "\n}\n\n} // namespace mlx::core::cu\n")
