#!/usr/bin/env bash
# Mutation testing, one module at a time: ./scripts/mutation.sh MODULE [mutmut run args]
# MODULE is a section of scripts/mutation.cfg (frame, messages, websocket, sniff, muxstate,
# ownership, ...). Not part of CI: a module takes minutes to an hour of CPU. It runs mutmut in a
# scratch copy of the tree (artifacts/mutation/MODULE) with one worker, so a shared machine stays
# usable, then prints the score and the surviving mutants (`mutmut show NAME` there shows one).
set -euo pipefail
cd "$(dirname "$0")/.."
module="${1:?usage: scripts/mutation.sh MODULE (a section of scripts/mutation.cfg)}"
shift
cfg=scripts/mutation.cfg
read_key() {  # read_key SECTION KEY: one value from the INI file
    .venv/bin/python - "$cfg" "$1" "$2" <<'PY'
import configparser, sys
p = configparser.ConfigParser()
p.read(sys.argv[1])
if not p.has_section(sys.argv[2]):
    sys.exit(f"scripts/mutation.cfg has no module {sys.argv[2]!r}; one of: {', '.join(p.sections())}")
print(p.get(sys.argv[2], sys.argv[3], fallback=""))
PY
}
source_file="$(read_key "$module" source)"
tests="$(read_key "$module" tests)"
deselect="$(read_key "$module" deselect)"  # optional: a pytest -k expression of tests to skip
.venv/bin/python -c "import mutmut" 2>/dev/null || {
    echo "mutmut is missing: .venv/bin/pip install -r scripts/mutation-requirements.txt" >&2; exit 2; }
work="artifacts/mutation/$module"
rm -rf "$work" && mkdir -p "$work"
# A scratch copy of the tracked files: mutmut writes mutants/ and its caches beside the config.
# templates/ is the dashboard's (lib/admin/app.py finds it beside lib/): mutmut copies only
# source_paths and tests into mutants/, so it is named in also_copy below.
git ls-files -z lib tests pytest.ini templates | xargs -0 cp --parents -t "$work"
test_args=""
for t in $tests; do test_args="$test_args\"$t\", "; done
# (quotes inside ${var:+...} do not survive a heredoc: build the -k pair here)
deselect_args=""
[ -n "$deselect" ] && deselect_args=", \"-k\", \"not ($deselect)\""
cat > "$work/pyproject.toml" <<TOML
[tool.mutmut]
source_paths = ["lib"]
only_mutate = ["$source_file"]
also_copy = ["templates"]
pytest_add_cli_args_test_selection = [${test_args%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"$deselect_args]
TOML
cd "$work"
# Tests that build a Go helper (tests/test_messages.py) default to a fresh cache per pytest
# session, i.e. a full build per mutant: one cache for the whole run.
export GOCACHE="${GOCACHE:-$PWD/gocache}"
nice -n 10 ../../../.venv/bin/mutmut run --max-children 1 "$@" > run.log 2>&1 || {
    tail -30 run.log >&2; exit 1; }
../../../.venv/bin/mutmut results --all true > results.txt 2>&1 || true
../../../.venv/bin/python - "$module" "$source_file" <<'PY'
import collections, re, sys
counts = collections.Counter()
survivors = []
for line in open("results.txt"):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if m:
        counts[m.group(2).strip()] += 1
        if m.group(2).strip() in ("survived", "no tests"):
            survivors.append(m.group(1))
total = sum(counts.values())
killed = counts["killed"] + counts["timeout"] + counts["segfault"]
score = 100.0 * killed / total if total else 0.0
print(f"{sys.argv[1]} ({sys.argv[2]}): {killed}/{total} killed = {score:.1f} %  {dict(counts)}")
for name in survivors:
    print("  survived:", name)
PY
