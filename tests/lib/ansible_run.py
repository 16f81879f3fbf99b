# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run modules the way Ansible runs them, and read their results back as data.

``ansible-playbook`` runs a small generated playbook: each task is the module under test,
with ``ignore_errors: true`` so that a failure is a result to look at. A notification
callback of our own (CALLBACK, written into the work dir) appends every task result, as
``register`` would hold it, to a JSON-lines file: ``changed``, ``failed``, ``msg``, ``diff``
and the return values, unabridged (the default callback leaves ``diff`` out of what it
prints, and the ``json`` callback is no longer in ansible-core). No stdout parsing.

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


# A notification callback that appends each task result, as the task registered it, to the
# file named by RGI_RESULTS_FILE: {"host", "task", "status", "result"} per line.
CALLBACK = """
import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "rgi_results"
    CALLBACK_NEEDS_ENABLED = True

    def _write(self, result, status):
        path = os.environ.get("RGI_RESULTS_FILE")
        if not path:
            return
        record = {"host": result.host.get_name(), "task": result.task.get_name(),
                  "status": status, "result": result.result}
        with open(path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\\n")

    def v2_runner_on_ok(self, result):
        self._write(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._write(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._write(result, "unreachable")

    def v2_runner_on_skipped(self, result):
        self._write(result, "skipped")
"""


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
    (so ``rabbitguard.limiter.*`` resolves to this working tree through collections/)."""

    def __init__(self, inventory, workdir, collections_path=None, timeout=300):
        self.inventory, self.workdir, self.timeout = inventory, workdir, timeout
        self.env = dict(os.environ)
        self.env.update(
            {
                "ANSIBLE_CONFIG": ANSIBLE_CFG,
                "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
                "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_FORCE_COLOR": "0",
                "ANSIBLE_RETRY_FILES_ENABLED": "0",
                "ANSIBLE_LOCAL_TEMP": os.path.join(workdir, "ansible-local"),
                "ANSIBLE_DEPRECATION_WARNINGS": "0",
                "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
            }
        )
        self.env["ANSIBLE_COLLECTIONS_PATH"] = collections_path or os.path.join(
            REPO_ROOT, "collections"
        )
        # The results of every task, unabridged (diff included), as JSON lines.
        plugins = os.path.join(workdir, "callback_plugins")
        os.makedirs(plugins, exist_ok=True)
        with open(os.path.join(plugins, "rgi_results.py"), "w") as handle:
            handle.write(CALLBACK)
        self.env["ANSIBLE_CALLBACK_PLUGINS"] = plugins
        self.env["ANSIBLE_CALLBACKS_ENABLED"] = "rgi_results"
        self.runs = []  # (argv, CompletedProcess) of every run, for failure reports

    def _run(self, argv, env=None):
        proc = subprocess.run(
            argv,
            env=env or self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        self.runs.append((argv, proc))
        return proc

    def play(self, hosts, tasks):
        """Run tasks (see task()) on hosts, in order; a list per task of {host: result},
        or the result itself when hosts names one host."""
        run_id = uuid.uuid4().hex[:12]
        results_file = os.path.join(self.workdir, "results-%s.jsonl" % run_id)
        play_tasks = []
        for index, spec in enumerate(tasks):
            play_tasks.append(
                {
                    "name": "rgi task %d" % index,
                    spec["module"]: spec["args"],
                    "check_mode": bool(spec["check"]),
                    "diff": bool(spec["diff"]),
                    "ignore_errors": True,
                }
            )
        playbook = [
            {
                "name": "rabbitguard integration " + run_id,
                "hosts": hosts,
                "gather_facts": False,
                "tasks": play_tasks,
            }
        ]
        path = os.path.join(self.workdir, "play-%s.yml" % run_id)
        with open(path, "w") as handle:
            json.dump(playbook, handle, indent=1)  # JSON is YAML
        env = dict(self.env, RGI_RESULTS_FILE=results_file)
        proc = self._run([_which("ansible-playbook"), "-i", self.inventory, path], env=env)
        if proc.returncode != 0:
            raise AnsibleFailed(
                "ansible-playbook exited %d\n--- stdout\n%s\n--- stderr\n%s"
                % (proc.returncode, proc.stdout[-6000:], proc.stderr[-4000:])
            )
        results = [{} for _spec in tasks]
        with open(results_file) as handle:
            for line in handle:
                record = json.loads(line)
                if record["status"] == "unreachable":
                    raise AnsibleFailed("%s unreachable: %s" % (record["host"], record["result"]))
                index = int(record["task"].rsplit(" ", 1)[1])
                result = record["result"]
                # As register would hold it (the callback's copy leaves the flag out).
                result.setdefault("failed", record["status"] == "failed")
                results[index][record["host"]] = result
        for index, per_host in enumerate(results):
            if not per_host:
                raise AnsibleFailed("task %d left no result\n%s" % (index, proc.stdout[-6000:]))
        if "," not in hosts and all(hosts in r for r in results):
            return [r[hosts] for r in results]
        return results

    def playbook(self, path, *options):
        """``ansible-playbook PATH OPTIONS``: (CompletedProcess, the results of every task as
        [{host, task, status, result}])."""
        results_file = os.path.join(self.workdir, "results-%s.jsonl" % uuid.uuid4().hex[:12])
        env = dict(self.env, RGI_RESULTS_FILE=results_file)
        proc = self._run(
            [_which("ansible-playbook"), "-i", self.inventory, path] + list(options), env=env
        )
        records = []
        if os.path.exists(results_file):
            with open(results_file) as handle:
                records = [json.loads(line) for line in handle]
        return proc, records

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
