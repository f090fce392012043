#!/usr/bin/env bash
# Print the path of a working CPython X.Y on this machine (exit 0), or nothing (exit 1). `make test-pythons` uses
# it to run the tests under each other Python the lock supports. uv finds interpreters on PATH and its own, but
# not pyenv's inactive versions (their shims fail), so look in $PYENV_ROOT/versions too. Nothing is downloaded.
#   bash tools/find_python.sh 3.12
set -uo pipefail
version=${1:?usage: find_python.sh X.Y}
uv=$(command -v uv || echo "python3 -m uv")
candidates=("$($uv python find --system --no-python-downloads "$version" 2>/dev/null)")
candidates+=($(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version" 2>/dev/null | sort -rV))
for py in "${candidates[@]}"; do
    # the interpreter must run and be that version (a pyenv shim exists for versions it will not run)
    if [ -n "$py" ] && [ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$version" ]; then
        echo "$py"
        exit 0
    fi
done
exit 1
