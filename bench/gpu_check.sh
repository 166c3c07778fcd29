#!/usr/bin/env bash
# dev: the CUDA-only tests, then GRPO steps at the RL shape (run on the GPU machine from the repo root)
# -e with pipefail: any failing command, a test behind the pipe to tail included, fails the check there.
set -euxo pipefail
python3 -m pytest -q tests/test_cuda_kernels.py tests/test_cuda_decode.py tests/test_cuda_sampling.py \
    tests/test_cuda_logprobs.py 2>&1 | tail -6
python3 -m pytest -q tests/test_llama_decode.py -k cuda_kernel 2>&1 | tail -3  # the Llama/Qwen decoder on the kernel
python3 -m pytest -q tests/test_nanochat_2026.py -k "decode_kernel or fast_decoder" 2>&1 | tail -6
python3 bench/attention_backward_probe.py  # the masked attention backward the shared-prompt update runs
python3 -m pytest -q tests/test_shared_prompt.py 2>&1 | tail -3
python3 bench/decode_parts.py --part loop --steps 256
python3 bench/grpo_step.py --depth 20 --steps 2 --compile --micro-batch-size 64 --prompt-len 400  # long prompts, shared
python3 bench/grpo_step.py --depth 20 --steps 3 --compile --micro-batch-size 64
python3 bench/grpo_step.py --depth 20 --steps 2 --compile --micro-batch-size 64 --compare
python3 bench/grpo_step.py --family nanochat_2026 --depth 20 --window-pattern SSSL --steps 2 --compile --micro-batch-size 64 --compare
python3 bench/grpo_step.py --family qwen3 --rollout-paths --bandwidth-tbs 4.8   # H200's 4.8 TB/s; H100: 3.35
python3 bench/grpo_step.py --family llama --rollout-paths --bandwidth-tbs 4.8
