# Sourced by scripts/demo, scripts/test and scripts/lint: the project's virtual environment.
#
#   edgepack_venv EXTRA     create .venv/ in the repository (once) and install edgepack[EXTRA] into it
#                           (again only when pyproject.toml changed); sets $VENV_PY to its python.
#
# Debian and Ubuntu refuse `pip install` into the system Python (PEP 668, externally-managed-environment),
# so nothing is installed outside .venv/. Delete .venv/ to start from scratch. EDGEPACK_PYTHON picks the
# interpreter that creates it (default: python3 on PATH).

edgepack_say() { printf '%s: %s\n' "${EDGEPACK_SCRIPT:-edgepack}" "$*" >&2; }

edgepack_venv() {
  local extra="$1"
  local repo venv python stamp want
  repo="$(pwd)"
  venv="$repo/.venv"
  python="${EDGEPACK_PYTHON:-python3}"

  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    if ! command -v "$python" >/dev/null 2>&1; then
      edgepack_say "FAILED: $python not found; install Python 3.11 or newer (apt-get install python3 python3-venv)"
      return 1
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      edgepack_say "FAILED: edgepack needs Python 3.11 or newer; $python is $("$python" -V 2>&1)." \
        "Set EDGEPACK_PYTHON to a newer interpreter."
      return 1
    fi
    local ver
    ver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
      edgepack_say "FAILED: $python ($ver) cannot create a virtual environment: its venv/ensurepip module is" \
        "missing. On Debian or Ubuntu install it with:  sudo apt-get install python3-venv" \
        "(or python$ver-venv), then run this command again."
      return 1
    fi
    edgepack_say "creating the project virtual environment $venv with $python ($ver)"
    rm -rf "$venv"
    if ! "$python" -m venv "$venv"; then
      rm -rf "$venv"
      edgepack_say "FAILED: $python -m venv $venv did not work (on Debian or Ubuntu: sudo apt-get install" \
        "python$ver-venv)"
      return 1
    fi
  else
    edgepack_say "using the project virtual environment $venv"
  fi
  VENV_PY="$venv/bin/python"

  # Install once per extra and pyproject.toml; [dev] includes [all].
  want="$(sha256sum pyproject.toml | cut -c1-16)"
  stamp="$venv/.edgepack-installed"
  if [ -f "$stamp" ] && { grep -qx "$extra $want" "$stamp" || { [ "$extra" = all ] && grep -qx "dev $want" "$stamp"; }; }
  then
    edgepack_say "edgepack[$extra] is installed in .venv (pyproject.toml unchanged)"
  else
    if [ -f "$stamp" ]; then
      edgepack_say "installing edgepack[$extra] into .venv with pip (pyproject.toml changed, or a new extra)"
    else
      edgepack_say "installing edgepack[$extra] into .venv with pip (editable; this first time takes several" \
        "minutes: TensorFlow and PyTorch are large downloads)"
    fi
    if ! "$VENV_PY" -m pip install --quiet --disable-pip-version-check -e ".[$extra]"; then
      edgepack_say "FAILED: pip could not install edgepack[$extra] into $venv (see pip's message above)"
      return 1
    fi
    echo "$extra $want" >>"$stamp"
  fi
  export PATH="$venv/bin:$PATH"
  export VIRTUAL_ENV="$venv"
}
