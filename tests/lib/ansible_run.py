# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run modules the way Ansible runs them, and read their results back as data.

``ansible-playbook`` runs a small generated playbook: each task is the module under test
with ``register`` and ``ignore_errors: true``, followed by a ``copy`` to the controller of
the registered result as JSON. The results come back exactly as a playbook sees them
(``changed``, ``failed``, ``msg``, ``diff``, return values), with no stdout callback
parsing (the ``json`` callback is no longer in ansible-core).

    runner = Ansible(inventory_path, workdir)
    (result,) = runner.play("rabbit1", [task("rabbitguard.limiter.rabbit_tc_limit", limit=3)])
    result["changed"], result["interfaces"]["host"]["eth0"]["action"]

``Ansible.adhoc`` runs the ``ansible`` command itself (exit code and output, for what a
user sees on a terminal).
"""

import json
import os
import shutil
import subprocess
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANSIBLE_CFG = os.path.join(REPO_ROOT, "ansible.cfg")
VENV_BIN = os.path.join(REPO_ROOT, ".venv", "bin")
LIMIT = "rabbitguard.limiter.rabbit_tc_limit"
INFO = "rabbitguard.limiter.rabbit_tc_limit_info"


class AnsibleFailed(AssertionError):
    """ansible-playbook itself failed (not a task: those are registered and returned)."""


def task(module, check=False, diff=False, **args):
    """One task of the generated playbook: the module with args, check and diff mode."""
    return {"module": module, "args": args, "check": check, "diff": diff}


def _which(tool):
    local = os.path.join(VENV_BIN, tool)
    return local if os.access(local, os.X_OK) else shutil.which(tool) or tool


class Ansible:
    """ansible / ansible-playbook against one inventory, with the repository's ansible.cfg
    (so ``rabbitguard.limiter.*`` resolves to this working tree through .collections)."""

    def __init__(self, inventory, workdir, collections_path=None, timeout=300):
        self.inventory, self.workdir, self.timeout = inventory, workdir, timeout
        self.env = dict(os.environ)
        self.env.update({
            "ANSIBLE_CONFIG": ANSIBLE_CFG,
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_LOCAL_TEMP": os.path.join(workdir, "ansible-local"),
            "ANSIBLE_DEPRECATION_WARNINGS": "0",
            "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        })
        self.env["ANSIBLE_COLLECTIONS_PATH"] = collections_path or os.path.join(
            REPO_ROOT, ".collections")
        self.runs = []          # (argv, CompletedProcess) of every run, for failure reports

    def _run(self, argv):
        proc = subprocess.run(argv, env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=self.timeout)
        self.runs.append((argv, proc))
        return proc

    def play(self, hosts, tasks):
        """Run tasks (see task()) on hosts, in order; a list per task of {host: result},
        or the result itself when hosts names one host."""
        run_id = uuid.uuid4().hex[:12]
        outdir = os.path.join(self.workdir, "results-" + run_id)
        os.makedirs(outdir)
        play_tasks = []
        for index, spec in enumerate(tasks):
            play_tasks.append({
                "name": "task %d: %s" % (index, spec["module"]),
                spec["module"]: spec["args"],
                "check_mode": bool(spec["check"]),
                "diff": bool(spec["diff"]),
                "register": "rgi_result",
                "ignore_errors": True,
            })
            play_tasks.append({
                "name": "result %d to the controller" % index,
                "ansible.builtin.copy": {
                    "content": "{{ rgi_result | to_json }}",
                    "dest": os.path.join(outdir, "{{ inventory_hostname }}-%d.json" % index),
                    "mode": "0600",
                },
                "delegate_to": "localhost",
                "check_mode": False,
                "diff": False,
            })
        playbook = [{"name": "rabbitguard integration " + run_id, "hosts": hosts,
                     "gather_facts": False, "tasks": play_tasks}]
        path = os.path.join(self.workdir, "play-%s.yml" % run_id)
        with open(path, "w") as handle:
            json.dump(playbook, handle, indent=1)   # JSON is YAML
        proc = self._run([_which("ansible-playbook"), "-i", self.inventory, path])
        if proc.returncode != 0:
            raise AnsibleFailed("ansible-playbook exited %d\n--- stdout\n%s\n--- stderr\n%s"
                                % (proc.returncode, proc.stdout[-6000:], proc.stderr[-4000:]))
        results = []
        for index in range(len(tasks)):
            per_host = {}
            for name in sorted(os.listdir(outdir)):
                host, _dash, rest = name.rpartition("-")
                if rest == "%d.json" % index:
                    with open(os.path.join(outdir, name)) as handle:
                        per_host[host] = json.load(handle)
            if not per_host:
                raise AnsibleFailed("task %d left no result\n%s" % (index, proc.stdout[-6000:]))
            results.append(per_host)
        if "," not in hosts and hosts in results[0]:
            return [r[hosts] for r in results]
        return results

    def run(self, host, module, check=False, diff=False, **args):
        """One module run on one host: its registered result."""
        (result,) = self.play(host, [task(module, check=check, diff=diff, **args)])
        return result

    def doc(self, module):
        """``ansible-doc -t module MODULE`` (does the module resolve?)."""
        return self._run([_which("ansible-doc"), "-t", "module", module])

    def adhoc(self, hosts, module, args="", *options):
        """``ansible HOSTS -m MODULE -a ARGS``: the CompletedProcess (rc, stdout, stderr)."""
        argv = [_which("ansible"), "-i", self.inventory, hosts, "-m", module]
        if args:
            argv += ["-a", args]
        return self._run(argv + list(options))
