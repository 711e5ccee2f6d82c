#!/usr/bin/env bash
# GPU checks and benchmarks of dwarf3gpu on a machine with an NVIDIA GPU, in two steps. From the repository root:
#
#   bash benchmarks/gpu_session.sh checks   # about 3-5 minutes
#   bash benchmarks/gpu_session.sh stack    # 500 full-size frames end to end
#
# `checks`: `dwarf3 doctor` (versions, GPU, every kernel compiled for every target, a self-test of each runnable
# target), every test marked `gpu` (the `cuda` cases of the stage-operation tests: every kernel through
# `KernelStageOps(CudaTarget())` against the NumPy reference; tests/test_gpu.py: the CUDA pipeline against the CPU
# master), and bench_kernels.py with its CUDA rows (kernel time, bytes per second against the memory-bandwidth
# roofline). `stack`: bench_stack.py with 500 simulated lights on the CUDA backend (`auto` picks it; the simulation
# is not timed).
#
# Needs the package's dependencies (pyproject.toml: NumPy, SciPy, astropy, astroalign, OpenCV, Typer, Rich,
# Matplotlib), CuPy with NVRTC (`pip install '.[cuda12]'` or `'.[cuda13]'`) and pytest. On a machine without network
# access, put the wheels it lacks (astropy, pyerfa, astropy-iers-data, pyyaml, astroalign, sep) in .whl/ beforehand,
# e.g. `pip download --no-deps --only-binary=:all: -d .whl astropy pyerfa astropy-iers-data pyyaml astroalign sep`
# (add --python-version and --platform to match that machine; keep .whl/ out of git, e.g. in .git/info/exclude): the
# script installs them into /tmp/site without a network.
#
# Everything printed, nvidia-smi's output and the result JSONs this run writes go to $OUT (default ./gpu-out).
# Record the numbers with the card's name in benchmarks/RESULTS.md.
set -uo pipefail
step=${1:?usage: gpu_session.sh checks|stack}
out=${OUT:-gpu-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
case "$step" in
  checks)
    python3 -m dwarf3gpu doctor 2>&1 | tee "$out/doctor.txt"
    python3 -m pytest -q -m gpu -rs tests 2>&1 | tee "$out/pytest-gpu.txt"
    python3 benchmarks/bench_kernels.py --threads 16 --clip-frames 40 2>&1 | tee "$out/bench_kernels.txt"
    ;;
  stack)
    python3 benchmarks/bench_stack.py --frames 500 --workers 16 --no-reference 2>&1 | tee "$out/bench_stack.txt"
    ;;
  *)
    echo "unknown step $step (checks or stack)" >&2
    exit 2
    ;;
esac
find benchmarks/results -name '*.json' -newer "$out/nvidia-smi.txt" -exec cp {} "$out/" \;
exit 0
