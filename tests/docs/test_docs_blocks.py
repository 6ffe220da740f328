"""Every python and shell block of README.md and docs/**/*.md runs as written, one test per block.

- A block is a fence whose language is python/py (run in this process) or bash/sh/shell/console
  (run with ``bash -eu -o pipefail``). Fences without a language, or text/yaml/..., are output or
  data, not code. The test id is ``page:line`` of the opening fence.
- Python blocks of one page build on each other (the README quick start's later lines use the
  model its first lines load), so they run in order in one namespace and one working folder per
  page. A block whose predecessor failed is skipped naming that block; run alone (``-k``), a
  block first runs its predecessors and fails naming the one that broke. Comment lines right
  below a ``print(...)`` line are its expected output and are checked ("..." matches anything;
  a comment that starts with "..." elides code and is not output).
- Blocks run in a tmp folder holding copies of ``examples/`` and ``tests/``: the documented
  relative paths assume the repo root, and outputs must never land in the repo. Shell blocks get
  a fresh folder each and the test's Python environment first on PATH, so ``deltatune`` is this
  project's CLI: its ``main`` with the command's arguments, in a process forked from one that
  imported the libraries once (see ``launcher``) rather than a new interpreter per command.
- Nothing downloads: the hub is offline; models and data are the bundled assets.
- Training on a budget: every run config, in this process and in the CLI processes (through a
  ``sitecustomize``), is capped to ``BUDGET`` (a few steps on a few dozen rows, short
  generations), a search to ``TRIALS`` trials and a comparison's grid to ``COMPARE_BUDGET`` and
  ``CANDIDATES``, so a command that trains for minutes as documented takes seconds here; the
  commands, files, flags and the whole pipeline are the documented ones.
- A comment right before a fence marks exceptions, greppable in the markdown:
  ``<!-- not run in tests: REASON -->`` (only for what cannot run inside the suite, e.g. the
  command that runs the suite) collects the block as skipped with REASON;
  ``<!-- slow in tests: REASON -->`` marks it ``slow`` (``-m "not slow"`` leaves it out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import importlib.abc
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell",
             "console": "shell"}
NOT_CODE = {"", "text", "yaml", "yml", "json", "toml", "csv", "diff"}  # output and data
FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})\s*(?P<language>[\w+-]*)")
NOTE = re.compile(r"^\s*<!--\s*(?P<kind>not run in tests|slow in tests):\s*(?P<reason>.+?)\s*-->\s*$")
# Caps on every run config a block trains with: (section, key, largest value).
BUDGET = [("data", "max_train_samples", 256), ("data", "max_eval_samples", 4), ("data", "max_test_samples", 4),
          ("training", "max_steps", 2), ("training", "batch_size", 2), ("task", "max_new_tokens", 8),
          ("task", "max_target_length", 16)]
TRIALS = 2  # trials of a hyperparameter search (deltatune tune, --trials)
# Caps on every comparison (deltatune compare): (field, largest value); a list keeps its first
# values (the first seed is the one that searches; tests/compare covers the later seeds). Two
# evaluations make each candidate pause after its first one and the winner resume.
COMPARE_BUDGET = [("seeds", 1), ("train_sizes", 1), ("models", 1), ("evaluations", 2), ("latency_batches", 1),
                  ("forgetting_texts", 4)]
CANDIDATES = 2  # learning rates a comparison's search tries per method: its grid's smallest and largest
SHELL_SECONDS = 900  # a slow shell block trains several runs; this only stops a hang


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    kind: str  # "python" or "shell"
    code: str
    skip: str | None = None  # why it is not run, from <!-- not run in tests: ... -->
    slow: str | None = None  # why it is slow, from <!-- slow in tests: ... -->

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fences(lines: list[str]) -> list[tuple[int, int, str]]:
    """(opening index, closing index, language) of every fenced block; closing is ``len(lines)``
    when the fence is never closed."""
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening:
            mark = opening["fence"]
            end = next((j for j in range(index + 1, len(lines))
                        if lines[j].strip().startswith(mark) and not lines[j].strip().strip(mark[0])), len(lines))
            found.append((index, end, opening["language"].lower()))
            index = end
        index += 1
    return found


def read_blocks(page: Path) -> list[Block]:
    """The python and shell blocks of one markdown page, with the notes right above their fences."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    for start, end, language in fences(lines):
        if language not in LANGUAGES:
            continue
        code = "\n".join(lines[start + 1:end])
        notes = _notes_above(lines, start)
        blocks.append(Block(page, start + 1, LANGUAGES[language],
                            _console_commands(code) if language == "console" else code,
                            notes.get("not run in tests"), notes.get("slow in tests")))
    return blocks


def _notes_above(lines: list[str], fence: int) -> dict[str, str]:
    """The ``<!-- not run in tests / slow in tests: REASON -->`` lines directly above a fence."""
    notes, index = {}, fence - 1
    while index >= 0 and (note := NOTE.match(lines[index])):
        notes[note["kind"]] = note["reason"]
        index -= 1
    return notes


def _console_commands(text: str) -> str:
    """The commands of a console transcript: ``$ `` lines and their ``\\`` continuations."""
    commands, continued = [], False
    for line in text.splitlines():
        if continued or line.startswith("$ "):
            commands.append(line if continued else line[2:])
            continued = line.endswith("\\")
    return "\n".join(commands)


BLOCKS = [block for page in PAGES for block in read_blocks(page)]


def _param(block: Block) -> Any:
    marks = [pytest.mark.slow] if block.slow else []
    if block.skip:
        marks.append(pytest.mark.skip(reason=f"not run in tests: {block.skip}"))
    return pytest.param(block, id=block.id, marks=marks)


# --- the budget ------------------------------------------------------------------------------


def capped(data: dict[str, Any]) -> dict[str, Any]:
    """A raw run config with ``BUDGET`` applied; values already smaller are kept."""
    data = {name: dict(section) if isinstance(section, dict) else section for name, section in data.items()}
    task_fields = _task_fields(data.get("task"))
    for section, key, largest in BUDGET:
        if section == "task" and key not in task_fields:
            continue  # only the task types that generate have these keys
        values = data.setdefault(section, {})
        if isinstance(values, dict) and not isinstance(values.get(key), str):
            values[key] = min(values.get(key) or largest, largest)
    data["training"]["progress"] = False
    return data


def _task_fields(task: Any) -> set[str]:
    from deltatune.tasks.base import task_class  # here, not at the top: collection imports no model code

    kind = task.get("type") if isinstance(task, dict) else None
    return {f.name for f in dataclasses.fields(task_class(str(kind)).config_class)} if kind else set()


def _limit_training(module: Any, patch: Callable[[Any, str, Any], None]) -> None:
    """``deltatune.train.config``: every ``RunConfig`` respects ``BUDGET``."""
    documented = module.RunConfig.from_dict.__func__

    def from_dict(cls: type, data: dict[str, Any]) -> Any:
        return documented(cls, capped(data) if isinstance(data, dict) else data)

    patch(module.RunConfig, "from_dict", classmethod(from_dict))


def _limit_search(optuna: Any, patch: Callable[[Any, str, Any], None]) -> None:
    """``optuna``: every search runs at most ``TRIALS`` trials."""
    documented = optuna.Study.optimize

    def optimize(study: Any, func: Any, n_trials: int | None = None, **options: Any) -> None:
        return documented(study, func, n_trials=min(n_trials or TRIALS, TRIALS), **options)

    patch(optuna.Study, "optimize", optimize)


def _limit_comparison(module: Any, patch: Callable[[Any, str, Any], None]) -> None:
    """``deltatune.compare.config``: every ``CompareConfig``, checked as given, respects
    ``COMPARE_BUDGET`` and searches ``CANDIDATES`` learning rates per method."""
    documented_post_init, documented_rates = module.CompareConfig.__post_init__, module.CompareConfig.learning_rates

    def post_init(config: Any) -> None:
        documented_post_init(config)
        for name, largest in COMPARE_BUDGET:
            value = getattr(config, name)
            setattr(config, name, value[:largest] if isinstance(value, list) else min(value, largest))

    def learning_rates(config: Any, method: dict[str, Any]) -> list[float]:
        rates = documented_rates(config, method)
        return rates if len(rates) <= CANDIDATES else [rates[0], rates[-1]]

    patch(module.CompareConfig, "__post_init__", post_init)
    patch(module.CompareConfig, "learning_rates", learning_rates)


LIMITS = {"deltatune.train.config": _limit_training, "optuna": _limit_search,
          "deltatune.compare.config": _limit_comparison}


def limit_runs(patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make every ``RunConfig`` (train, compare, tune), search and comparison in this process
    respect the budget; ``patch`` is ``monkeypatch.setattr``, so other test files see the
    library as it is."""
    for name, limit in LIMITS.items():
        limit(importlib.import_module(name), patch)


def limit_runs_when_imported() -> None:
    """The same in a CLI process, each module patched right after it is imported: a command
    imports nothing it would not import by itself (``deltatune --help`` stays light)."""
    for name, limit in LIMITS.items():
        if name in sys.modules:
            limit(sys.modules[name], setattr)
        else:
            sys.meta_path.insert(0, _AfterImport(name, limit))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds module ``name`` as the other finders would and calls ``then(module, setattr)`` once
    it has run."""

    def __init__(self, name: str, then: Callable[[Any, Callable], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                self.then(module, setattr)

            spec.loader.exec_module = exec_module
        return spec


SITECUSTOMIZE = f"""\
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_docs_blocks import limit_runs_when_imported
limit_runs_when_imported()
del sys.path[0]
"""


@pytest.fixture(scope="session")
def budget_path(tmp_path_factory) -> Path:
    """A folder whose ``sitecustomize.py`` puts the budget into every CLI process of a block."""
    folder = tmp_path_factory.mktemp("budget")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def workspace(folder: Path) -> Path:
    """``folder`` with copies of what the documented relative paths need from the repo root."""
    for name in ("examples", "tests"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


# --- python blocks ---------------------------------------------------------------------------


@dataclass
class Page:
    folder: Path
    namespace: dict[str, Any] = field(default_factory=lambda: {"__name__": "__main__"})
    ran: int = 0  # blocks of the page run so far, in order
    broken: str | None = None  # the id of the block that failed, once one has


@pytest.fixture(scope="session")
def pages() -> dict[Path, Page]:
    """Each page's python state, shared by the tests of its blocks."""
    return {}


def run_python(block: Block, page: Page) -> None:
    """Run a block in its page's namespace and check the output its comments promise."""
    code = compile("\n" * block.line + block.code, str(block.page), "exec")  # tracebacks name page lines
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            exec(code, page.namespace)
    finally:
        print(output.getvalue(), end="")
    printed = output.getvalue()
    for expected in expected_output(block.code):
        pattern = ".*".join(re.escape(part) for part in expected.split("..."))
        if not any(re.fullmatch(pattern, line.strip()) for line in printed.splitlines()):
            raise AssertionError(f"{block.id}: the comment promises the output line\n  {expected}\n"
                                 f"but the block printed:\n{printed}")


def expected_output(code: str) -> list[str]:
    """Comment lines directly below a top-level ``print(...)`` line: the output it promises
    (``# ... train ...``, elided code rather than output, starts with "...")."""
    expected, below_print = [], False
    for line in code.splitlines():
        if below_print and line.startswith("# ") and not line.startswith("# ..."):
            expected.append(line[2:].strip())
            continue
        below_print = line.startswith("print(")
    return expected


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if b.kind == "python"])
def test_python_block(block: Block, pages, tmp_path_factory, monkeypatch):
    """The block runs after its page's earlier python blocks, in their namespace and folder."""
    siblings = [b for b in BLOCKS if b.page == block.page and b.kind == "python"]
    page = pages.setdefault(block.page, Page(workspace(tmp_path_factory.mktemp(block.page.stem))))
    monkeypatch.chdir(page.folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    limit_runs(monkeypatch.setattr)
    position = siblings.index(block)
    if page.broken:
        pytest.skip(f"builds on {page.broken}, which failed")
    for earlier in siblings[page.ran:position]:  # run alone: its page's blocks before it first
        try:
            run_python(earlier, page)
        except Exception as error:
            page.broken = earlier.id
            pytest.fail(f"{earlier.id}, run first because {block.id} builds on it, failed: {error!r}")
        page.ran += 1
    try:
        run_python(block, page)
    except Exception:
        page.broken = block.id
        raise
    page.ran = position + 1
    if page.ran == len(siblings):
        page.namespace.clear()  # the page's models and optimizers, no longer needed


# --- shell blocks ----------------------------------------------------------------------------

# Each ``deltatune`` command of a block would spend seconds importing torch, transformers and
# the rest before doing anything. ``launcher`` puts first on PATH a ``deltatune`` that asks a
# server, started once with a block's environment, to fork: the fork runs ``deltatune.cli.main``
# with the command's arguments, folder, environment and standard streams, exits as the console
# script would (``sys.exit(main())``), and the launcher exits with its status. The server has
# imported those libraries (after the ``offline_and_quiet`` set-up that every command does
# first) and run nothing. A command whose environment differs from the server's, or any trouble
# reaching the server, runs the installed console script instead.

PRELOAD = ["torch", "transformers", "accelerate", "datasets", "safetensors", "sklearn.metrics", "scipy.stats",
           "matplotlib.pyplot", "torch.utils.tensorboard", "optuna", "seqeval.metrics", "rouge_score.rouge_scorer",
           "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama",
           "transformers.models.encoder_decoder.modeling_encoder_decoder", "deltatune", "deltatune.cli",
           "deltatune.methods", "deltatune.train.loop", "deltatune.train.inference", "deltatune.compare.runner",
           "deltatune.search.runner", "deltatune.io.convert", "deltatune.io.export", "deltatune.demo"]
# what bash sets by itself, and pytest's name of the test running (it changes with every test)
NOT_COMPARED = {"PWD", "OLDPWD", "SHLVL", "_", "PYTEST_CURRENT_TEST"}

LAUNCHER = """\
#!{python} -IS
import json, os, socket, sys
def installed():
    os.execv({script!r}, [{script!r}, *sys.argv[1:]])
try:
    server = socket.socket(socket.AF_UNIX)
    server.connect({address!r})
    request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
    socket.send_fds(server, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
    answer = b""
    while chunk := server.recv(64):
        answer += chunk
except OSError:
    installed()
if answer in (b"", b"refused"):
    installed()
status = int(answer)
sys.exit(status if status >= 0 else 128 - status)
"""


def serve(address: str) -> None:
    """The server's process: import, then fork a ``deltatune`` process per request."""
    from deltatune.env import offline_and_quiet

    environment = dict(os.environ)  # what a command's must be: without what offline_and_quiet adds
    offline_and_quiet()
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    if threading.active_count() > 1:
        return  # a Python thread would not survive the fork: no server (the native pools of
        # OpenBLAS, jemalloc... that the imports start fork as for DataLoader workers)
    gc.freeze()  # the commands' collections then skip (and do not copy) what the server holds
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(8)
    listener.settimeout(1.0)
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:  # pytest still there
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:  # finished waiters
                pass
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        if os.fork() == 0:
            listener.close()
            _wait_for_command(connection, environment, Path(address).with_name("refused.log"))
        connection.close()


def _wait_for_command(connection: socket.socket, environment: dict[str, str], refused: Path) -> None:
    """A waiter: read a launcher's request, fork the command, send back its exit status (or
    refuse it, noting in ``refused`` the variables that differ)."""
    connection.settimeout(None)
    data, streams, _, _ = socket.recv_fds(connection, 1 << 16, 3)
    while len(data) < 8 or len(data) < 8 + int.from_bytes(data[:8], "big"):
        data += connection.recv(1 << 16)
    request = json.loads(data[8:])
    from deltatune.env import SETTINGS

    # as the command will see it: main() first sets what the variables a caller left unset
    asked, served = {**SETTINGS, **request["env"]}, {**SETTINGS, **environment}
    differ = {k for k in {*asked, *served} - NOT_COMPARED if asked.get(k) != served.get(k)}
    if differ or len(streams) != 3:
        with refused.open("a") as log:
            log.write(f"{request['argv']}: {', '.join(sorted(differ)) or 'no standard streams'}\n")
        connection.sendall(b"refused")
        os._exit(0)
    command = os.fork()
    if command == 0:
        connection.close()
        for number, stream in enumerate(streams):
            os.dup2(stream, number)
            os.close(stream)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [str(Path(sys.executable).parent / "deltatune"), *request["argv"]]
        from deltatune.cli import main

        sys.exit(main())  # up through serve(): the interpreter exits as the console script's would
    for stream in streams:
        os.close(stream)
    _, status = os.waitpid(command, 0)
    connection.sendall(str(os.waitstatus_to_exitcode(status)).encode())
    os._exit(0)


@pytest.fixture(scope="session", autouse=True)
def server(request, budget_path, tmp_path_factory):
    """The server's folder and process, started with the session when it runs a shell block, so
    that its imports overlap the python blocks; None without shell blocks."""
    if not any(item.originalname == "test_shell_block" and not item.get_closest_marker("skip")
               for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("launcher")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_docs_blocks; " \
           f"test_docs_blocks.serve({str(folder / 'server.sock')!r})"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=folder, env=shell_env(budget_path, folder),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    yield folder, process
    process.terminate()
    process.wait()
    process.stdout.close()
    if (folder / "refused.log").is_file():  # correct, only slower: say so
        warnings.warn("these deltatune commands ran the installed console script, their environment "
                      f"differing from the server's:\n{(folder / 'refused.log').read_text()}")


@pytest.fixture(scope="session")
def launcher(server):
    """A folder holding the ``deltatune`` launcher, its server ready; None if the server did not
    start (the blocks then run the installed console script)."""
    folder, process = server
    address = str(folder / "server.sock")
    ready = process.stdout.readline().strip() == "ready"
    if ready:
        script = folder / "deltatune"
        script.write_text(LAUNCHER.format(python=sys.executable, script=str(Path(sys.executable).parent / "deltatune"),
                                          address=address))
        script.chmod(0o755)
    else:
        warnings.warn("the deltatune server did not start: each command imports the libraries itself")
    return folder if ready else None


def shell_env(budget_path: Path, launcher: Path | None = None) -> dict[str, str]:
    """The environment of a shell block: this Python environment's ``deltatune`` (or the launcher's)
    first on PATH, the budget, nothing from the hub."""
    path = os.pathsep.join([*([str(launcher)] if launcher else []), str(Path(sys.executable).parent),
                            os.environ["PATH"]])
    return {**os.environ, "PATH": path,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(budget_path), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg"}


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if b.kind == "shell"])
def test_shell_block(block: Block, tmp_path, budget_path, launcher):
    """The block runs with bash, stopping at the first command that fails, in a fresh folder."""
    workspace(tmp_path)
    env = shell_env(budget_path, launcher)
    try:
        done = subprocess.run(["bash", "-eu", "-o", "pipefail", "-c", block.code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=SHELL_SECONDS)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{block.id} ran over {SHELL_SECONDS} s; output:\n{error.stdout}\n{error.stderr}")
    print(done.stdout[-6000:], done.stderr[-6000:], sep="\n")
    if done.returncode:
        pytest.fail(f"{block.id} exited with {done.returncode}:\n{done.stderr[-4000:]}", pytrace=False)


def test_no_block_hides_from_these_tests():
    """A typo in a fence's language, an unclosed fence or a misplaced note would hide a block."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        lines = text.splitlines()
        for start, end, language in fences(lines):
            where = f"{page.relative_to(ROOT)}:{start + 1}"
            assert end < len(lines), f"{where}: the fence is never closed"
            assert language in LANGUAGES or language in NOT_CODE, (
                f"{where}: unknown language {language!r}; add it to LANGUAGES (code) or NOT_CODE")
        notes = re.findall(r"<!--\s*(?:not run|slow) in tests", text)
        marked = sum(bool(b.skip) + bool(b.slow) for b in BLOCKS if b.page == page)
        assert len(notes) == marked, f"{page.relative_to(ROOT)}: a test note not right above a python/shell fence"
