"""Damaged or foreign adapter files are refused clearly; a kill or a full disk loses nothing.
(Fuzzed configs and files: test_fuzz.py.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import deltatune as dt
from tiny import assert_same, build, file_hashes, inputs, output, perturb, shown_at, snapshot


@pytest.fixture
def saved(tmp_path):
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=4, modules_to_save=["classifier"]))
    perturb(model)
    dt.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def rewrite_description(path: Path, edit: Callable[[dict], Any], beside: bool = True) -> None:
    """Replace the description saved inside the weights file with ``edit(description)`` (tensors
    kept), and the adapter_config.json beside it unless ``beside`` is False."""
    weights = path / "adapter_model.safetensors"
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    text = json.dumps(edit(json.loads(metadata["deltatune"])))
    save_file(load_file(weights), weights, metadata={**metadata, "deltatune": text})
    if beside:
        (path / "adapter_config.json").write_text(text)


def refused(path, phrase, model=None):
    model = model or build("bert")
    tensors, files = snapshot(model), file_hashes(path)
    with pytest.raises(dt.AdapterFileError, match=phrase):
        dt.load_adapter(model, path)
    assert_same(model, tensors, "a refused load must leave the model as it was")
    assert not hasattr(model, "_deltatune_state")
    assert file_hashes(path) == files, "a load never writes"


def test_missing_directory(tmp_path):
    refused(tmp_path / "nope", r"(?s)^adapter directory '.*nope' does not exist\.\n  fix: pass the directory that "
                               r"holds adapter_config\.json and adapter_model\.safetensors\.$")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"(?s)^'.*empty' has no adapter_model\.safetensors\.\n  fix: save the adapter again\.$")


def test_truncated_weights(saved):
    _, path = saved
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(path, r"(?s)^'.*adapter_model\.safetensors' is not a valid safetensors file \(.*\)\.\n  fix: the file is "
                  r"truncated or corrupted: save or copy it again\.$")


def test_garbage_weights(saved):
    _, path = saved
    (path / "adapter_model.safetensors").write_bytes(b"\x00\x01not a tensor file")
    refused(path, "not a valid safetensors file")


def test_damaged_config_inside_the_weights_file(saved):
    """Found by the file fuzzer: the header stays valid JSON, the config string inside it not."""
    _, path = saved
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    assert data.count(b'\\"format\\"') == 1
    weights.write_bytes(data.replace(b'\\"format\\"', b"  format  "))
    refused(path, r"(?s)adapter/adapter_model\.safetensors' is corrupted: the config saved inside it is not valid JSON "
                  r"\(.*\)\.\n  fix: the file is truncated or corrupted: save or copy it again\.$")


def test_config_inside_the_weights_file_that_is_no_json_object(saved):
    _, path = saved
    rewrite_description(path, lambda description: [1, 2], beside=False)
    refused(path, r"(?s)^'.*adapter/adapter_model\.safetensors' is corrupted: the config saved inside it is not a JSON "
                  r"object\.\n  fix: the file is truncated or corrupted: save or copy it again\.$")


def test_config_that_is_not_json_and_no_embedded_copy(saved):
    model, path = saved
    dt.save_adapter(model, path, format="peft")  # peft files carry no embedded config
    (path / "adapter_config.json").write_text("{not json")
    refused(path, r"(?s)adapter_config\.json' is not valid JSON .*fix: restore the file or save the adapter again")


def test_the_weights_file_alone_loads_from_its_embedded_config(saved, recwarn):
    """adapter_config.json lost: the config saved inside the weights file is enough, and nothing warns."""
    model, path = saved
    (path / "adapter_config.json").unlink()
    fresh = build("bert")
    dt.load_adapter(fresh, path)
    assert output(fresh, inputs("bert")).tolist() == output(model, inputs("bert")).tolist()
    assert not [w for w in recwarn if "adapter_config" in str(w.message)]


def test_config_naming_an_unknown_method(saved):
    model, path = saved
    dt.save_adapter(model, path, format="peft")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "WIZARD"}))
    refused(path, r"(?m)^peft adapters of type 'WIZARD' cannot be read by deltatune\.$")
    with pytest.raises(dt.AdapterFileError) as info:
        dt.load_adapter(build("bert"), path)
    assert info.value.hint.startswith("supported peft types: ") and {"LORA", "IA3", "PROMPT_TUNING"} <= set(
        info.value.hint.removeprefix("supported peft types: ").removesuffix(".").split(", "))


def test_pickle_is_never_loaded(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / "adapter_config.json").write_text("{}")
    refused(folder, r"(?s)^'.*pickled' has no adapter_model\.safetensors\.\n  fix: 'adapter_model\.bin' is a pickle file, "
                    r"which deltatune never loads: convert it to safetensors with the tool that wrote it\.$")
    (folder / "adapter_model.bin").rename(folder / "weights.pt")
    refused(folder, r"'weights\.pt' is a pickle file")


def test_adapter_of_another_base_model(saved):
    _, path = saved
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=3))
    refused(path, "another base model", other)


def test_adapter_naming_modules_this_model_lacks(saved):
    """Found by the adapter-file fuzzer: one damaged byte in the embedded config renamed the
    'classifier' of modules_to_save; the load must say the file does not fit, not blame a config."""
    _, path = saved
    rewrite_description(path, lambda d: {**d, "config": {**d["config"], "target_modules": ["lassifier"]}})
    refused(path, r"(?s)does not fit BertForSequenceClassification: target_modules entry 'lassifier' matches no "
                  r"module.*fix: load it into the base model it was trained on")


@pytest.mark.parametrize("change,problem", [
    ({"r": 0}, "lora.r = 0 is out of range: must be at least 1."),
    ({"rank": 8}, "unknown key '{path}/adapter_config.json:config.rank' for method 'lora'."),
])
def test_a_stored_config_that_is_not_usable_is_named_with_one_fix(saved, change, problem):
    _, path = saved
    rewrite_description(path, lambda d: {**d, "config": {**d["config"], **change}})
    with pytest.raises(dt.AdapterFileError) as info:
        dt.load_adapter(build("bert"), path)
    assert str(info.value) == (f"the config in '{path}' is not usable: {problem.format(path=path)}\n"
                               "  fix: save the adapter again with this version of deltatune.")


def test_a_config_without_its_method_config_is_not_usable(saved):
    model, path = saved
    dt.save_adapter(model, path, format="peft")  # no embedded config: adapter_config.json is all there is
    (path / "adapter_config.json").write_text(json.dumps({"format": "deltatune"}))
    refused(path, r"(?s)^the config in '.*adapter' is not usable: it has no 'config' entry\.\n  fix: save the adapter "
                  r"again with this version of deltatune\.$")


def test_an_adapter_under_another_name_saves_and_loads_as_that_adapter(saved, tmp_path):
    model, _ = saved
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["query"]), adapter_name="small")
    dt.save_adapter(model, tmp_path / "small", adapter_name="small")
    assert {tuple(t.shape) for t in load_file(tmp_path / "small" / "adapter_model.safetensors").values()} == \
        {(2, 32), (32, 2)}  # "small" alone (r=2, query), not the default adapter (r=4, with its head)
    fresh = dt.load_adapter(build("bert"), tmp_path / "small", adapter_name="small")
    assert list(dt.core.state.require_state(fresh).configs) == ["small"]
    assert dt.adapter_state_dict(fresh, "small").keys() == dt.adapter_state_dict(model, "small").keys()


def test_a_load_refused_after_its_tensors_were_copied_leaves_the_model_as_it_was(saved):
    """The base fingerprint is checked after the tensors are in: the rollback must take them
    out again (tensors compared by value: a merge instead of a delete keeps the keys)."""
    _, path = saved
    rewrite_description(path, lambda d: {**d, "base_fingerprint": "sha256:0000000000000000"})
    refused(path, "another base model")


def test_full_disk_while_saving_keeps_the_old_adapter(saved, monkeypatch):
    model, path = saved
    batch = inputs("bert")
    expected = output(model, batch)
    perturb(model, seed=5)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("deltatune.io.adapter_files.save_file", no_space)
    with pytest.raises(dt.AdapterFileError) as info:
        dt.save_adapter(model, path)
    assert str(info.value) == (f"could not write the adapter to '{path}': No space left on device.\n  fix: free disk "
                               "space or choose a writable directory; any previous adapter there is intact.")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = build("bert")
    dt.load_adapter(fresh, path)
    torch.testing.assert_close(output(fresh, batch), expected, atol=0, rtol=0)


SAVER = """
import os, sys, time, torch, deltatune as dt
import deltatune.io.adapter_files as adapter_files, deltatune.io.atomic as atomic
sys.path.insert(0, {tests!r})
from tiny import build
model = build("bert")
dt.apply(model, dt.FullFineTuningConfig())


def fill(value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def stalled(path, write):
    # A writer that stops halfway through the file named {stall!r}: it writes the whole file
    # aside, copies half of its bytes where atomic_write told it to, tells the parent, waits.
    def half_then_wait(target):
        write(target + ".whole")
        data = open(target + ".whole", "rb").read()
        os.unlink(target + ".whole")
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        print("writing", flush=True)
        time.sleep(600)
    return real(path, half_then_wait if os.path.basename(path) == {stall!r} else write)


fill(1.0)
dt.save_adapter(model, {path!r})
print("saved", flush=True)
sys.stdin.readline()  # the parent has read the saved files
real = atomic.atomic_write
atomic.atomic_write = adapter_files.atomic_write = stalled
fill(2.0)
dt.save_adapter(model, {path!r})
"""


def same_code() -> dict[str, str]:
    """The environment for a child process that imports deltatune from where this process does
    (under ``make mutation``, the mutated copy)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def loaded_values(path) -> set[float]:
    model = build("bert")
    dt.load_adapter(model, path)
    return {v for p in model.parameters() for v in p.flatten().unique().tolist()}


@pytest.mark.parametrize("stall,values", [("adapter_model.safetensors", {1.0}), ("adapter_config.json", {2.0})])
def test_sigkill_while_saving_leaves_a_loadable_adapter(tmp_path, stall, values):
    """SIGKILL lands inside the write of one file (the child says when it is halfway): that file
    keeps its old bytes, the adapter loads whole (the weights of one save: the first if the
    weights were being written, the second if the weights were done and the config was being
    written), and the next save replaces the files and deletes the killed writer's leftover."""
    path = tmp_path / "adapter"
    script = SAVER.format(tests=str(Path(__file__).parents[1]), path=str(path), stall=stall)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=same_code())
    try:
        assert proc.stdout.readline().strip() == "saved"  # one whole save exists
        before = (path / stall).read_bytes()
        proc.stdin.write("go on\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "writing"  # the child is halfway through `stall`
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (path / stall).read_bytes() == before, f"a killed save changed {stall}"
    assert loaded_values(path) == values, "a loaded adapter is one whole save, never a mix"
    [leftover] = [p.name for p in path.iterdir() if p.name.startswith(".")]  # no process left to delete it
    assert leftover.startswith(f".{stall}.") and leftover.endswith(".tmp")

    model = build("bert")
    dt.apply(model, dt.FullFineTuningConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    dt.save_adapter(model, path)
    assert loaded_values(path) == {3.0}, "the next save must replace the files"
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_save_leaves_the_temporary_file_of_a_live_writer_alone(tmp_path):
    """Only leftovers of killed writers are deleted: another process's save in progress holds
    its temporary file locked, and a save of the same file next to it must not delete it."""
    from deltatune.io.atomic import atomic_write_text

    atomic_write_text(tmp_path / "report.json", "{}")
    busy, dead = tmp_path / ".report.json.busy.tmp", tmp_path / ".report.json.dead.tmp"
    busy.write_text("half")
    dead.write_text("half")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        atomic_write_text(tmp_path / "report.json", "[]")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "report.json"]
    assert (tmp_path / "report.json").read_text() == "[]"


def test_a_write_in_progress_is_no_leftover_to_a_second_writer(tmp_path):
    """The first thing a save does is delete leftovers of killed saves: one that starts while
    another is writing (here: from inside the first one's write) must leave its file alone."""
    from deltatune.io.atomic import atomic_write, remove_leftovers

    target = tmp_path / "report.json"

    def write(tmp):
        Path(tmp).write_text("{}")
        remove_leftovers(target)
        assert Path(tmp).exists(), "a live writer's temporary file was taken for a leftover"

    atomic_write(target, write)
    assert target.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_leftover_that_vanishes_meanwhile_does_not_stop_the_cleanup(tmp_path, monkeypatch):
    from deltatune.io.atomic import remove_leftovers

    first, second = tmp_path / ".report.json.a.tmp", tmp_path / ".report.json.b.tmp"
    first.write_text("half")
    second.write_text("half")
    real_open, vanished = os.open, []

    def open_vanished_first(path, *args):
        if not vanished:  # the first one listed: its writer renamed it between the listing and the open
            vanished.append(Path(path))
            raise FileNotFoundError(path)
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", open_vanished_first)
    remove_leftovers(tmp_path / "report.json")
    assert [p for p in (first, second) if p.exists()] == vanished  # the other one was still deleted


def test_a_write_reaches_the_disk_before_it_replaces_the_file(tmp_path, monkeypatch):
    """The order that survives a power cut: the new bytes flushed (fsync) before the rename, the
    directory entry flushed after it; the temporary file is a dot-file beside the target."""
    from deltatune.io.atomic import atomic_write_text

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "report.json"
    atomic_write_text(target, "{}")
    tmp = events[0][1]
    assert events == [("fsync", tmp), ("replace", tmp, str(target)), ("fsync", str(tmp_path))]
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".report.json.") and tmp.endswith(".tmp")
    assert target.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_follow_the_umask_like_any_other_tool(tmp_path, mask):
    """Temporary files are created 0o600; the rename must not carry that over."""
    from deltatune.io.atomic import atomic_write_text
    from deltatune.train.checkpoint import save_checkpoint

    old = os.umask(mask)
    try:
        model = build("bert")
        dt.apply(model, dt.LoraConfig(r=4))
        dt.save_adapter(model, tmp_path / "adapter")
        atomic_write_text(tmp_path / "report.json", "{}")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        checkpoint = save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, {})
    finally:
        os.umask(old)
    files = [*(tmp_path / "adapter").iterdir(), tmp_path / "report.json", *checkpoint.iterdir()]
    assert files and {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~mask}
    assert checkpoint.stat().st_mode & 0o777 == 0o777 & ~mask


UTF8_CHECK = """
import codecs, locale, sys
import deltatune as dt
from deltatune.io.atomic import atomic_write_text
print(codecs.lookup(locale.getpreferredencoding(False)).name)  # "ascii", however the platform spells it
atomic_write_text(sys.argv[1], "caf\\u00e9 \\u2713")
assert dt.read_adapter(sys.argv[2])[0]["base_model_name_or_path"] == "mod\\u00e8le"
"""


def test_text_files_are_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """A bare C locale (or a Windows code page) must not change what is written or read: the same
    calls run here, then in a process whose locale says ASCII."""
    dt.save_adapter(dt.apply(build("bert"), dt.LoraConfig(r=4)), tmp_path / "peft", format="peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = {**json.loads(config_path.read_text(encoding="utf-8")), "base_model_name_or_path": "mod\u00e8le"}
    config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")  # as other tools write it
    monkeypatch.setattr(sys, "argv", ["", str(tmp_path / "here.txt"), str(tmp_path / "peft")])
    exec(UTF8_CHECK, {})  # here, where the locale is UTF-8
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(Path(dt.__file__).parents[1])}  # the deltatune this test imported
    ascii_run = subprocess.run([sys.executable, "-c", UTF8_CHECK, str(tmp_path / "ascii.txt"), str(tmp_path / "peft")],
                               env=env, capture_output=True, text=True, timeout=120)
    assert ascii_run.returncode == 0 and ascii_run.stdout.strip() == "ascii", ascii_run.stderr[-2000:]
    for name in ("here.txt", "ascii.txt"):
        assert (tmp_path / name).read_bytes() == "caf\u00e9 \u2713".encode("utf-8")


def test_a_damaged_or_stale_config_beside_the_weights_gives_way_to_the_embedded_one(saved):
    """The weights file holds the config it was saved with: a damaged adapter_config.json, or one
    that differs (a save interrupted between the two files), is named and the embedded one used."""
    model, path = saved
    expected = output(model, inputs("bert"))
    config = path / "adapter_config.json"
    stale = {**json.loads(config.read_text()), "config": {**json.loads(config.read_text())["config"], "r": 2}}
    for text, phrase in [("{not json", r"adapter_config\.json is not valid JSON \(.*\); using the config saved inside "
                                       r"the weights file\."),
                         (json.dumps(stale), r"adapter_config\.json differs from the config saved inside the weights "
                                             r"file \(an interrupted save\?\); using the one saved with the weights\.")]:
        config.write_text(text)
        fresh = build("bert")
        with pytest.warns(UserWarning, match=phrase) as caught:
            dt.load_adapter(fresh, path)
        assert shown_at(caught[0], __file__)  # at the user's call, not inside deltatune
        assert output(fresh, inputs("bert")).tolist() == expected.tolist()


@pytest.mark.parametrize("config,phrase", [
    (None, r"(?s)adapter_config\.json' is missing\..*fix: save the adapter again"),
    ({"hello": 1}, r"(?s)adapter_config\.json' is neither a deltatune nor a peft adapter config\..*fix: point to a "
                   r"directory written by deltatune\.save_adapter or peft's save_pretrained"),
])
def test_weights_without_an_embedded_config_need_a_readable_one_beside_them(saved, config, phrase):
    model, path = saved
    dt.save_adapter(model, path, format="peft")  # peft files carry no embedded config
    (path / "adapter_config.json").unlink()
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps(config))
    refused(path, phrase)
