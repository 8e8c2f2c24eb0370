# Source on the GPU machine after `source .device/unpack.sh`, before starting tritonserver:
#   source perf/device_stub_env.sh
# Why: tritonserver 2.51's Python backend stub cannot run under numpy 2 (measured on the H100 machine, numpy
# 2.5.2: every decoupled response reached the client with its shapes and zero bytes; here on CPU with numpy
# 2.3 the stubs fail their health check). The stub embeds Python and ignores PYTHONPATH: its sys.path comes
# from the python3 first on PATH. So this makes a virtualenv whose own site-packages hold numpy 1.26.4 (from
# a cp312 wheel carried in .device/wheels or .device/numpy1) and whose .pth file appends the GPU machine's
# site-packages (torch, triton, transformers), and puts it first on PATH for the server and everything else.
_wheel=$(ls .device/wheels/numpy-1.26.*-cp312-*.whl .device/numpy1/numpy-1.26.*-cp312-*.whl 2>/dev/null | head -1)
if python3 -c 'import numpy, sys; sys.exit(0 if numpy.__version__.startswith("1.") else 1)' 2>/dev/null \
   && [ "$(python3 -c 'import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))')" != /tmp/site ]; then
  echo "device_stub_env: python3 already has numpy 1.x"
elif [ -z "$_wheel" ]; then
  echo "device_stub_env: no numpy 1.26 cp312 wheel in .device/wheels; the server's stubs will run under numpy 2" >&2
else
  _base=$(PYTHONPATH= python3 -c 'import site; print(site.getsitepackages()[0])')
  [ -x /tmp/stub-venv/bin/python3 ] || python3 -m venv --without-pip /tmp/stub-venv
  _sp=$(/tmp/stub-venv/bin/python3 -c 'import site; print(site.getsitepackages()[0])')
  python3 -m pip install -q --no-index --no-deps --target "$_sp" "$_wheel"
  # The machine's packages, seen through a directory of links that leaves out numpy and the packages built
  # for numpy 2 only (scipy, scikit-learn, pandas): under numpy 1.26 they fail to import, and transformers,
  # which imports them when it finds them, then failed to load AutoTokenizer (measured on the H200 machine).
  # An "import" line in a .pth runs at start-up; addsitedir also reads that directory's own .pth files.
  python3 - "$_base" /tmp/stub-site <<'PY'
import os, re, sys
base, links = sys.argv[1:]
os.makedirs(links, exist_ok=True)
hidden = re.compile(r"^(numpy|scipy|sklearn|scikit_learn|pandas)([-_.].*)?$", re.IGNORECASE)
for name in os.listdir(base):
    target, link = os.path.join(base, name), os.path.join(links, name)
    if not hidden.match(name) and not os.path.lexists(link):
        os.symlink(target, link)
PY
  echo "import site; site.addsitedir('/tmp/stub-site')" > "$_sp/zz-base-site-packages.pth"
  export PATH=/tmp/stub-venv/bin:$PATH
  echo "device_stub_env: $(python3 -c 'import numpy, torch; from transformers import AutoTokenizer; print("numpy", numpy.__version__, "torch", torch.__version__, "AutoTokenizer ok")')"
fi
unset _wheel _base _sp
