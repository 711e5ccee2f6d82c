#!/usr/bin/env bash
# The GPU checks and benchmarks of issue 5 in two calls of the lent GPU machine (see the developers' guide and
# /work/.library/device/README.md). That machine has CuPy, OpenCV, SciPy, Typer, Rich and pytest but not astropy,
# astroalign or sep: fetch those wheels here first, then carry them:
#
#   echo /.whl/ >> .git/info/exclude; ../shared/tools/gpu-wheels.sh .whl
#   run(command="bash benchmarks/gpu_session.sh checks", carry=[".whl"])    # about 3-5 minutes
#   run(command="bash benchmarks/gpu_session.sh stack", carry=[".whl"])     # 500 full-size frames end to end
#
# `checks`: doctor (versions, GPU, every kernel compiled), the GPU tests (every kernel through CuPy against the
# NumPy reference, the CUDA pipeline against the CPU master), bench_kernels.py (CUDA rows: kernel time, bytes per
# second against the memory-bandwidth roofline). `stack`: bench_stack.py with 500 lights on the CUDA backend
# (simulation not timed). Everything printed and every result JSON is copied to $OUT (the device tool brings it
# back); record the numbers with the card's name in benchmarks/RESULTS.md.
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
    python3 -m pytest -q -m gpu -rs tests/test_gpu.py tests/test_kernels.py 2>&1 | tee "$out/pytest-gpu.txt"
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
cp benchmarks/results/*.json "$out/" 2>/dev/null
exit 0
