# Install the exp2 peers that the GPU machine lacks (DeepSpeed ZeRO-Inference and its pure-Python needs) from the
# files carried in .whl/ (carry: [".whl"]). Source it from the repository root, before pytest:
#     source scripts/gpu_peers_setup.sh && python3 -m pytest -m h100 tests_exp2 ...
# The machine has no network; everything goes into /tmp/site, put first on PYTHONPATH. A failed install is reported
# and left at that: the DeepSpeed peer claims then fail, saying the peer did not run (no skip, no pass).
# .whl/ was filled on the CPU machine with:
#   python3 -m pip download --no-deps --no-binary=:all: deepspeed==0.19.8 -d .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions py-cpuinfo einops msgpack
_djinn_site=/tmp/site
mkdir -p "$_djinn_site"
exec 9>"$_djinn_site.lock"
flock 9  # lanes of scripts/gpu_suite.sh --gpu share one install; the first one makes it
if [ -e "$_djinn_site/.djinn_peers_installed" ]; then
    :
elif [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$_djinn_site" .whl/*.whl \
        || echo "gpu_peers_setup: wheel install failed; the DeepSpeed peer claims will fail, saying it did not run" >&2
    DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-build-isolation --no-deps --no-compile --no-cache-dir \
        --target "$_djinn_site" .whl/deepspeed-0.19.8.tar.gz \
        || echo "gpu_peers_setup: deepspeed build failed; the DeepSpeed peer claims will fail, saying it did not run" >&2
    touch "$_djinn_site/.djinn_peers_installed"
else
    echo "gpu_peers_setup: no .whl/ here (carry it); the DeepSpeed peer claims will fail, saying it did not run" >&2
fi
flock -u 9
exec 9>&-
export PYTHONPATH="$_djinn_site${PYTHONPATH:+:$PYTHONPATH}"
# DeepSpeed in one process still initialises torch.distributed; the peer test sets MASTER_ADDR/PORT, RANK, WORLD_SIZE.
unset _djinn_site
