"""GPU kernels for jaxllm."""
