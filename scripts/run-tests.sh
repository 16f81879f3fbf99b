#!/usr/bin/env bash
# Run every check of rabbitguard.limiter: host set-up, lint, pytest, Molecule.
#
#   sudo scripts/run-tests.sh                 # everything
#   sudo scripts/run-tests.sh -m 'not bpf'    # extra arguments go to pytest
#   sudo scripts/run-tests.sh tests/unit -x   # ... including test paths
#
# Steps:
#   1. scripts/setup-host.sh (root only; idempotent, seconds when nothing is missing)
#   2. lint: ruff check, ruff format --check, yamllint, shellcheck, ansible-lint (when there are roles/playbooks),
#      antsibull-changelog lint, ansible-test sanity (on the built collection, with each
#      ansible-core of the CI matrix: tests/controller/ansible-core-versions.txt)
#   3. pytest over tests/ (all markers: unit, bpf, integration), with a JUnit report
#   4. Molecule scenarios, when extensions/molecule/ exists (`molecule test --all`)
# Every step runs even when an earlier one failed; the exit status is non-zero if any failed.
#
# pytest finding no test is an error. With CI=true (as .ci/run sets it) a skipped test is a
# failure: tests/conftest.py reports it so, and the JUnit report is checked here as well.
#
# Environment: RUN_TESTS_SKIP_SETUP=1, RUN_TESTS_SKIP_LINT=1, RUN_TESTS_SKIP_MOLECULE=1 leave
# out a step (never in CI: there every step runs).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO}"
VENV="${REPO}/.venv"
PY="${VENV}/bin/python"
OUT="${REPO}/tests/output"
JUNIT="${OUT}/junit.xml"
export PATH="${VENV}/bin:${PATH}"
export ANSIBLE_CONFIG="${REPO}/ansible.cfg"

is_ci() { case "${CI:-}" in 1 | [Tt]rue | TRUE | [Yy]es) return 0 ;; *) return 1 ;; esac; }

banner() { printf '\n==== %s ====\n' "$*"; }
log() { printf '[run-tests] %s\n' "$*"; }

declare -a RESULTS=()
FAILED=0
record() { # record NAME STATUS [DETAIL]
    RESULTS+=("$(printf '%-14s %-6s %s' "$1" "$2" "${3:-}")")
    [[ $2 == ok || $2 == skip ]] || FAILED=1
}
skip_step() { # skip_step VAR: true when the step may be left out
    if [[ "${!1:-0}" == 1 ]]; then
        if is_ci; then
            log "$1=1 is ignored in CI: every step runs"
            return 1
        fi
        return 0
    fi
    return 1
}

# --------------------------------------------------------------------------------------------
# 1. Host set-up
# --------------------------------------------------------------------------------------------
banner "setup: scripts/setup-host.sh"
if skip_step RUN_TESTS_SKIP_SETUP; then
    record setup skip "RUN_TESTS_SKIP_SETUP=1"
elif [[ ${EUID} -ne 0 ]]; then
    if is_ci; then
        log "CI must run as root (it installs packages and loads BPF programs)"
        exit 1
    fi
    log "not root: host set-up left out; bpf and integration tests will be skipped"
    record setup skip "not root"
else
    bash "${REPO}/scripts/setup-host.sh"
    record setup ok
fi
[[ -x ${PY} ]] || { log "ERROR: ${PY} is missing: run 'sudo scripts/setup-host.sh' first"; exit 1; }

# --------------------------------------------------------------------------------------------
# 2. Lint
# --------------------------------------------------------------------------------------------
run_lint() { # run_lint NAME COMMAND...
    local name=$1
    shift
    banner "lint: $*"
    if "$@"; then
        record "${name}" ok
    else
        record "${name}" FAIL "$*"
    fi
}

# ansible-test needs the collection at .../ansible_collections/rabbitguard/limiter (a real
# path: it resolves symlinks), so sanity runs on the built artifact, installed in a temp dir:
# exactly what users get (no lab/, scripts/, bench/, tests/). The tarball is checked first:
# only the collection's own content, no local state or build output.
# ansible_test_sanity [BINDIR]: with the ansible-core of BINDIR (default: .venv's).
# shellcheck disable=SC2317  # called through run_lint
ansible_test_sanity() {
    local bindir=${1:-${VENV}/bin} tmp rc=0 pyver
    if [[ ! -x ${bindir}/ansible-test ]]; then
        log "ERROR: ${bindir}/ansible-test is missing: run 'sudo scripts/setup-host.sh' first"
        return 1
    fi
    tmp="$(mktemp -d /tmp/rabbitguard-sanity.XXXXXX)"
    pyver="$("${bindir}/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    # Away from the repository's ansible.cfg, whose collections_path already holds the
    # collection (install would find nothing to do).
    (
        cd "${tmp}" && unset ANSIBLE_CONFIG \
            && "${bindir}/ansible-galaxy" collection build --output-path "${tmp}" "${REPO}" \
            && tarball_has_only_content "${tmp}"/rabbitguard-limiter-*.tar.gz \
            && "${bindir}/ansible-galaxy" collection install --offline --force -p "${tmp}/install" \
                "${tmp}"/rabbitguard-limiter-*.tar.gz \
            && cd "${tmp}/install/ansible_collections/rabbitguard/limiter" \
            && PATH="${bindir}:${PATH}" "${bindir}/ansible-test" sanity --local --python "${pyver}"
    ) || rc=$?
    rm -rf "${tmp}"
    return "${rc}"
}

# The tarball's top-level entries are the collection's content and nothing else (galaxy.yml
# build_ignore): a new top-level name in the repository must be shipped or ignored on purpose.
# shellcheck disable=SC2317  # called from ansible_test_sanity
tarball_has_only_content() {
    local extra
    extra="$(tar tzf "$1" | cut -d/ -f1 | sort -u | grep -vxE \
        'MANIFEST.json|FILES.json|README.md|LICENSE|LICENSES|changelogs|docs|files|meta|playbooks|plugins|roles|tests' \
        || true)"
    # Of tests/, only ansible-test's sanity ignore files.
    extra+="$(tar tzf "$1" | grep -E '^tests/.' | grep -vE '^tests/sanity(/|$)' || true)"
    if [[ -n ${extra} ]]; then
        log "ERROR: the collection tarball holds what build_ignore should leave out: ${extra//$'\n'/ }"
        return 1
    fi
    extra="$(tar tzf "$1" | grep -E '(^|/)(__pycache__|\.mypy_cache|\.plugin-cache\.yaml|junit[^/]*\.xml)' || true)"
    if [[ -n ${extra} ]]; then
        log "ERROR: the collection tarball holds local state: ${extra//$'\n'/ }"
        return 1
    fi
}

# The ansible-core releases of the CI matrix (tests/controller/ansible-core-versions.txt), each
# in a bare venv made by setup-host.sh: .venv-ansible-<major.minor>.
mapfile -t ANSIBLE_MATRIX < <(grep -Ev '^[[:space:]]*(#|$)' "${REPO}/tests/controller/ansible-core-versions.txt")
MAIN_ANSIBLE_CORE="$("${PY}" -c 'import importlib.metadata as m; print(m.version("ansible-core"))')"

if skip_step RUN_TESTS_SKIP_LINT; then
    record lint skip "RUN_TESTS_SKIP_LINT=1"
else
    run_lint ruff ruff check "${REPO}"
    run_lint ruff-format ruff format --check "${REPO}"
    run_lint mypy mypy  # plugins/module_utils, as [tool.mypy] in pyproject.toml says
    run_lint yamllint yamllint --strict "${REPO}"
    mapfile -t shell_files < <(
        find scripts .ci -maxdepth 2 -type f \( -name '*.sh' -o -path '.ci/run' \) 2>/dev/null | sort
    )
    if [[ ${#shell_files[@]} -gt 0 ]]; then
        run_lint shellcheck shellcheck -x "${shell_files[@]}"
    fi
    if [[ -d roles || -d playbooks || -d extensions ]]; then
        run_lint ansible-lint ansible-lint
    fi
    run_lint changelog antsibull-changelog lint
    if [[ -d plugins ]]; then
        run_lint sanity ansible_test_sanity
        # And with every other release of the matrix (the main .venv has the newest).
        for version in "${ANSIBLE_MATRIX[@]}"; do
            [[ ${version} != "${MAIN_ANSIBLE_CORE}" ]] || continue
            run_lint "sanity-${version%.*}" ansible_test_sanity "${REPO}/.venv-ansible-${version%.*}/bin"
        done
    fi
fi

# --------------------------------------------------------------------------------------------
# 3. pytest
# --------------------------------------------------------------------------------------------
banner "pytest: ${PY} -m pytest $*"
mkdir -p "${OUT}"
rm -f "${JUNIT}"
set +e
"${PY}" -m pytest -rs --continue-on-collection-errors --junitxml="${JUNIT}" "$@"
PYTEST_RC=$?
set -e

# Counts from the JUnit report: passed failed skipped total.
read -r N_PASSED N_FAILED N_SKIPPED _ < <(
    "${PY}" - "${JUNIT}" <<'PY' || echo "0 0 0 0"
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("0 0 0 0")
    sys.exit(0)
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
total = sum(int(s.get("tests", 0)) for s in suites)
failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(max(total - failed - skipped, 0), failed, skipped, total)
PY
)
case ${PYTEST_RC} in
    0) pytest_status=ok ;;
    5)
        log "ERROR: pytest collected no tests (exit 5): that is a failure, not a pass"
        pytest_status=FAIL
        ;;
    *) pytest_status=FAIL ;;
esac
if is_ci && [[ ${N_SKIPPED} -gt 0 ]]; then
    log "ERROR: ${N_SKIPPED} test(s) skipped with CI=true: skipped in CI means not run"
    pytest_status=FAIL
fi
record pytest "${pytest_status}" \
    "exit ${PYTEST_RC}: ${N_PASSED} passed, ${N_FAILED} failed, ${N_SKIPPED} skipped (report ${JUNIT#"${REPO}"/})"

# --------------------------------------------------------------------------------------------
# 4. Molecule: the fleet scenario(s) on local test hosts, once extensions/molecule/ exists
# --------------------------------------------------------------------------------------------
if [[ -d ${REPO}/extensions/molecule ]]; then
    if skip_step RUN_TESTS_SKIP_MOLECULE; then
        record molecule skip "RUN_TESTS_SKIP_MOLECULE=1"
    elif [[ ${EUID} -ne 0 ]]; then
        record molecule skip "not root"
    else
        banner "molecule: (cd extensions && molecule test --all)"
        # Molecule makes its own Ansible configuration: the repository's ANSIBLE_CONFIG is not
        # passed on (scenarios set what they need in their molecule.yml).
        if (cd "${REPO}/extensions" && unset ANSIBLE_CONFIG && molecule test --all); then
            record molecule ok
        else
            record molecule FAIL "molecule test --all"
        fi
    fi
fi

# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
banner "summary"
printf '%s\n' "${RESULTS[@]}"
if [[ ${FAILED} -ne 0 ]]; then
    log "FAILED (see the steps marked FAIL above)"
else
    log "all checks passed"
fi
# The closing line, in the plain form that CI reads: N passed, N failed, N skipped.
printf 'tests: %d passed, %d failed, %d skipped\n' "${N_PASSED}" "${N_FAILED}" "${N_SKIPPED}"
exit "${FAILED}"
