#!/usr/bin/env bash
# The main job, end to end on one fresh machine (as root): install what is needed,
# start a throwaway test host (sshd on 127.0.0.1, unprivileged user tmremote), make
# sample photos and a video in a new local directory, and run stand-in Topaz CLIs on
# them through topyaz-mount. The test host is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    echo "== installing system packages and topyaz-mount"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        fuse3 libfuse3-dev pkg-config openssh-server openssh-client ffmpeg \
        python3-venv python3-dev >/dev/null
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test,remote]'
    python3 tools/testhost.py setup
fi

state=$(mktemp -d /tmp/topyaz-demo-host.XXXXXX)
work=$(mktemp -d /tmp/topyaz-demo.XXXXXX)
python3 tools/testhost.py start --state-dir "$state" >"$state/start.log" 2>&1 &
host_pid=$!
cleanup() {
    # The session the execs left up for the next one (--persist) ends before its host.
    for s in $(topyaz-mount status --json 2>/dev/null | python3 -c \
            'import json, sys; [print(s["name"]) for s in json.load(sys.stdin) if s["root"] == sys.argv[1]]' \
            "$work"); do
        topyaz-mount unmount "$s" >/dev/null 2>&1 || true
    done
    kill $host_pid 2>/dev/null; wait $host_pid 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do [ -f "$state/env.sh" ] && break; sleep 0.2; done
[ -f "$state/env.sh" ] || { cat "$state/start.log"; exit 1; }
# shellcheck disable=SC1091
source "$state/env.sh"

cd "$work"
python3 "$repo/tools/make_samples.py" shots >/dev/null
run() { echo "\$ $*"; "$@"; }
tm=(topyaz-mount exec --remote "$TM_REMOTE" -F "$TM_SSH_CONFIG")

echo "== Photo AI on one image, output to ./out/"
run "${tm[@]}" -- tpai --cli "./shots/gradient.png" -o ./out/
echo "== Gigapixel on the whole folder, output to ./out/giga/ (named like the inputs)"
run "${tm[@]}" -- gigapixel --cli -i ./shots -o ./out/giga/ --scale 2
echo "== Video AI through topyaz (writes next to the input)"
run "${tm[@]}" video shots/clip.mp4
echo "== the same batch again: the remote cache has every input, so no content moves"
run "${tm[@]}" --stats -- gigapixel --cli -i ./shots -o ./out/giga/ --scale 2 --overwrite
echo "== exit status passes through"
set +e
"${tm[@]}" -- sh -c 'echo "remote cwd: $PWD"; exit 3'
echo "exit status: $?"
set -e
echo "== results in $work"
ls -la "$work/out" "$work/out/giga" "$work/shots"
