#!/usr/bin/env bash
# Freezes ambit-cni with PyInstaller into build/cni-frozen/ambit-cni/ (the
# executable build/cni-frozen/ambit-cni/ambit-cni beside its _internal/), for
# hosts with no Python at all: it carries its own interpreter and the few
# standard-library modules the plugin imports, and ignores PYTHON* variables.
#
# One directory, not one file: measured here (VERSION, median of 40 runs) the
# one-file build took ~105 ms, because it unpacks itself into /tmp on every
# run; the one-directory build ~40 ms; for comparison `python3 -IS` with the
# staged plugin (scripts/stage-cni.sh) ~27 ms and the venv's console script
# ~53 ms. bench/frozen_cni.py measures them side by side.
#
# Everything the plugin never imports is excluded: besides the size, modules
# such as inspect and multiprocessing bring PyInstaller runtime hooks that
# run at every start (they took the build from ~40 to ~110 ms). The build is
# then checked: every module the plugin imports on any command path under
# the real interpreter must be in the archive, and the executable must answer
# VERSION and fail ADD cleanly with an empty environment.
#
#   bash scripts/freeze-cni.sh              build
#   bash scripts/freeze-cni.sh --if-stale   build only if cni/, this script or the toolchain changed
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PY:-$repo/.venv/bin/python}
out=build/cni-frozen
exe=$out/ambit-cni/ambit-cni

inputs_digest() {
    { cat cni/*.py "$0"; "$PY" -c 'import sys, PyInstaller; print(sys.version, PyInstaller.__version__)'; } \
        | sha256sum | cut -d' ' -f1
}

mkdir -p build
exec 9>build/.cni-frozen.lock
flock 9  # one build at a time (tests and benchmarks may ask together)

digest=$(inputs_digest)
if [[ ${1:-} == --if-stale && -x $exe && -f $out/.inputs && $(cat "$out/.inputs") == "$digest" ]]; then
    exit 0
fi
"$PY" -c 'import PyInstaller' 2>/dev/null || {
    echo "freeze-cni: PyInstaller is not installed in $PY (make venv installs it from requirements-dev.txt)" >&2
    exit 1
}

# PyInstaller does not see through the editable install's import hook:
# stage ambit/cni as a plain source tree.
stage=$(mktemp -d "${TMPDIR:-/tmp}/ambit-freeze.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/src/ambit/cni"
cp cni/*.py "$stage/src/ambit/cni/"
cat > "$stage/ambit-cni.py" <<'ENTRY'
from ambit.cni.main import main
main()
ENTRY

excludes=(
    asyncio concurrent multiprocessing inspect pkgutil dataclasses argparse pydoc unittest tkinter
    email http xml xmlrpc ssl ctypes decimal _pydecimal fractions statistics numbers
    tarfile zipfile gzip bz2 lzma shutil tempfile pickle subprocess getpass netrc ftplib
    urllib.request mimetypes calendar datetime _strptime csv random secrets hashlib hmac base64
    queue runpy py_compile tracemalloc importlib.metadata typing_extensions
)
args=()
for m in "${excludes[@]}"; do args+=(--exclude-module "$m"); done

# hpack decodes Huffman-coded headers on a rare path of cni/grpc_unary.py;
# the frozen plugin carries it (the -IS staged plugin cannot see it).
"$PY" -m PyInstaller --noconfirm --clean --log-level WARN --onedir --name ambit-cni \
    --paths "$stage/src" --hidden-import hpack.huffman_table "${args[@]}" \
    --distpath "$stage/dist" --workpath "$stage/work" --specpath "$stage" "$stage/ambit-cni.py"

hpack_root=$("$PY" -c 'import hpack, os; print(os.path.dirname(os.path.dirname(hpack.__file__)))')
"$PY" -I -S - "$stage/dist/ambit-cni/ambit-cni" "$stage/src" "$hpack_root" <<'CHECK'
"""Every module the plugin imports on any command path must be in the build."""
import io, sys  # the plugin imports both; anything else only after the probe
bundle_exe, src, hpack_root = sys.argv[1:4]
sys.path[:0] = [src, hpack_root]
from ambit.cni import agent_client, grpc_unary, main, spec, wire  # noqa: F401
import hpack.huffman_table  # noqa: F401  (grpc_unary's rare path)
import urllib.parse  # noqa: F401  (grpc_unary's error path)
conf = b'{"cniVersion":"1.0.0","name":"n","type":"ambit-cni","agentSocket":"/nonexistent/ambit.sock",' \
       b'"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]}}'
base = {"CNI_CONTAINERID": "c", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0"}
for command in ("VERSION", "ADD", "DEL", "CHECK", "STATUS", "GC"):
    main.run({**base, "CNI_COMMAND": command}, conf, io.StringIO(), io.StringIO())
main.run({**base, "CNI_COMMAND": "ADD"}, b"{not json", io.StringIO(), io.StringIO())
# (typing registers typing.io/typing.re as plain attributes: no spec, nothing to bundle)
needed = {m for m, mod in sys.modules.items()
          if m not in sys.builtin_module_names and getattr(mod, "__spec__", None) is not None}

import os, zipfile  # noqa: E401
from PyInstaller.archive.readers import CArchiveReader
archive = CArchiveReader(bundle_exe)
have = set(archive.toc) | set(archive.open_embedded_archive("PYZ.pyz").toc)
internal = os.path.join(os.path.dirname(bundle_exe), "_internal")
with zipfile.ZipFile(os.path.join(internal, "base_library.zip")) as z:
    for name in z.namelist():
        mod = name[:-4].replace("/", ".")
        have |= {mod[:-len(".__init__")] if mod.endswith(".__init__") else mod}
dynload = os.path.join(internal, f"python{sys.version_info[0]}.{sys.version_info[1]}", "lib-dynload")
have |= {f.split(".")[0] for f in os.listdir(dynload)} if os.path.isdir(dynload) else set()
frozen = {m for m in needed if getattr(sys.modules[m], "__spec__", None) is not None
          and sys.modules[m].__spec__.origin in ("frozen", "built-in")}
missing = sorted(needed - have - frozen - {"__main__"})
if missing:
    sys.exit(f"freeze-cni: the frozen plugin lacks modules the plugin imports: {', '.join(missing)} "
             f"(remove them from the excludes in scripts/freeze-cni.sh)")
CHECK

# Run it as a runtime would on a host without Python: empty environment, from /.
got=$(cd / && env -i CNI_COMMAND=VERSION "$stage/dist/ambit-cni/ambit-cni" </dev/null)
[[ $got == *'"supportedVersions"'* ]] || { echo "freeze-cni: VERSION answered: $got" >&2; exit 1; }
set +e
got=$(cd / && env -i CNI_COMMAND=ADD CNI_CONTAINERID=c CNI_NETNS=/proc/self/ns/net CNI_IFNAME=eth0 \
    "$stage/dist/ambit-cni/ambit-cni" 2>/dev/null <<<'{"cniVersion":"1.0.0","name":"n","type":"ambit-cni",
    "agentSocket":"/nonexistent/ambit.sock","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]}}')
set -e
[[ $got == *'"code": 11'* ]] || { echo "freeze-cni: ADD without an agent answered: $got" >&2; exit 1; }
set +e
got=$(cd / && env -i CNI_COMMAND=ADD CNI_CONTAINERID=c CNI_NETNS=/proc/self/ns/net CNI_IFNAME=eth0 \
    "$stage/dist/ambit-cni/ambit-cni" 2>/dev/null <<<'{not json')
set -e
[[ $got == *'"code": 6'*'(char 1)'* ]] || { echo "freeze-cni: ADD with malformed JSON answered: $got" >&2; exit 1; }

rm -rf "$out.new"
mkdir -p "$out.new"
mv "$stage/dist/ambit-cni" "$out.new/ambit-cni"
echo "$digest" > "$out.new/.inputs"
rm -rf "$out"
mv "$out.new" "$out"
echo "froze $exe ($(du -sh "$out/ambit-cni" | cut -f1))"
