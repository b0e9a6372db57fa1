import json
from pathlib import Path

import pytest

from morlaif.artifacts import ShardWriter, confine, read_jsonl, write_json, write_jsonl
from morlaif.errors import InputError
from morlaif.lifecycle import run_stage


def test_read_jsonl_names_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": \n{"prompt": "c"}\n')
    with pytest.raises(InputError) as e:
        read_jsonl(p)
    assert str(e.value).startswith(f"{p}:2: malformed JSON line")
    p.write_text('{"prompt": "a"}\n{"x": 1}\n')
    with pytest.raises(InputError, match=r":2: key 'prompt': missing field"):
        read_jsonl(p, required=("prompt",))
    p.write_text('[1, 2]\n')
    with pytest.raises(InputError, match="JSON object"):
        read_jsonl(p)
    with pytest.raises(InputError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_shard_drops_torn_line_and_appends(tmp_path):
    p = tmp_path / "s.jsonl"
    w = ShardWriter(p)
    w.append([{"i": 0}, {"i": 1}])
    with open(p, "a") as f:
        f.write('{"i": 2, "tor')  # a crash mid-write
    assert [r["i"] for r in read_jsonl(p, shard=True)] == [0, 1]
    with pytest.raises(InputError):
        read_jsonl(p)  # as a user file the torn line is an error
    w = ShardWriter(p)  # reopening truncates the torn tail
    w.append([{"i": 2}])
    assert [r["i"] for r in read_jsonl(p)] == [0, 1, 2]


def test_atomic_writes_leave_no_temp(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    write_jsonl(tmp_path / "b.jsonl", [{"y": 2}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.jsonl"]


def test_stage_skip_resume_refuse_and_force(tmp_path):
    calls = []
    inp = tmp_path / "in.txt"
    inp.write_text("v1")

    def body(d):
        calls.append(d)
        (d / "out.txt").write_text(f"done {len(calls)}")
        return {"n": 1}

    d = tmp_path / "stage"
    run_stage("s", d, config={"a": 1}, inputs=[inp], body=body, log=lambda m: None)
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "complete" and man["summary"] == {"n": 1} and "torch" in man["versions"]
    assert man["wall_time_s"] >= 0 and man["inputs"] == {"in.txt": man["inputs"]["in.txt"]}  # relative to the run
    run_stage("s", d, config={"a": 1}, inputs=[inp], body=body, log=lambda m: None)
    assert len(calls) == 1  # skipped
    inp.write_text("v2")  # input changed: refused, one line naming it, nothing touched
    with pytest.raises(InputError) as e:
        run_stage("s", d, config={"a": 1}, inputs=[inp], body=body, log=lambda m: None)
    assert "input in.txt changed" in str(e.value) and "\n" not in str(e.value) and len(calls) == 1
    assert (d / "out.txt").read_text() == "done 1"
    with pytest.raises(InputError, match=r"a: 1 -> 2"):  # a setting changed: the same
        run_stage("s", d, config={"a": 2}, inputs=[inp], body=body, log=lambda m: None)
    logs = []
    run_stage("s", d, config={"a": 1}, inputs=[inp], body=body, force=True, log=logs.append)  # --force: redone
    assert len(calls) == 2 and (d / "out.txt").read_text() == "done 2"
    kept = list((tmp_path / ".replaced").iterdir())  # the finished stage moved aside, never deleted
    assert [p.name.startswith("stage-") for p in kept] == [True] and (kept[0] / "out.txt").read_text() == "done 1"
    assert any(str(kept[0]) in m for m in logs)

    # An interrupted stage keeps its shards and resumes; with another config it is refused, forced afresh.
    def crash(d):
        ShardWriter(d / "rows.jsonl").append([{"i": 0}])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage("s", d, config={"a": 2}, inputs=[inp], body=crash, force=True, log=lambda m: None)
    assert json.loads((d / "manifest.json").read_text())["status"] == "failed"
    seen = []
    run_stage("s", d, config={"a": 2}, inputs=[inp],
              body=lambda d: seen.append(ShardWriter(d / "rows.jsonl").rows()), log=lambda m: None)
    assert seen == [[{"i": 0}]]
    with pytest.raises(InputError):
        run_stage("s", d, config={"a": 3}, inputs=[inp], body=lambda d: seen.append(1), log=lambda m: None)
    run_stage("s", d, config={"a": 3}, inputs=[inp], force=True,
              body=lambda d: seen.append((d / "rows.jsonl").exists()), log=lambda m: None)
    assert seen[-1] is False and len(list((tmp_path / ".replaced").iterdir())) == 3


def test_settings_added_or_removed_later_are_no_change():
    """A field a stage's manifest lacks (added by a later morlaif) is no change while it keeps its default;
    a field the config no longer has (removed or renamed) is none either; a value inside a dict field is."""
    from morlaif.lifecycle import config_changes
    from morlaif.config import Config

    now = Config().sections("rl")
    old = json.loads(json.dumps(now))
    del old["rl"]["warmup_steps"]  # recorded before the key existed
    old["rl"]["report_to"] = "tensorboard"  # recorded before the key moved to logging.report_to
    assert config_changes(old, now) == []
    changed = Config(rl={"warmup_steps": 3, "weights": {"honesty": 1.0}}).sections("rl")
    assert config_changes(old, changed) == ["rl.weights: null -> {\"honesty\": 1.0}", "rl.warmup_steps: 0 -> 3"]
    assert config_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: (unset) -> 2"]  # a plain dict: every leaf


def test_confine(tmp_path):
    assert confine(tmp_path, "a/b.json") == (tmp_path / "a/b.json").resolve()
    with pytest.raises(InputError):
        confine(tmp_path, "../escape.json")
    with pytest.raises(InputError):
        confine(tmp_path, "/etc/passwd")


def test_one_process_per_stage_and_stale_temps_removed_on_resume(tmp_path):
    import subprocess
    import sys

    from morlaif.lifecycle import stage_lock
    from morlaif.errors import RunError

    d = tmp_path / "stage"
    # another process holds the stage: refused with its pid, nothing touched
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from pathlib import Path; from morlaif.lifecycle import stage_lock\n"
                               "with stage_lock(Path(sys.argv[2])):\n print('held', flush=True); time.sleep(60)",
                               str(Path(__file__).resolve().parents[1] / "src"), str(d)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=rf"in use by another morlaif process \(pid {holder.pid}\)"):
            run_stage("s", d, config={}, body=lambda d: None, log=lambda m: None)
        assert not d.exists()
    finally:
        holder.kill()  # SIGKILL: the OS releases its lock
        holder.wait()
    with stage_lock(d):  # free again
        pass

    # a writer killed mid-write left temp files: removed when the stage resumes; real rows kept
    def crash(d):
        ShardWriter(d / "rows.jsonl").append([{"i": 0}])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage("s", d, config={}, body=crash, log=lambda m: None)
    (d / ".metrics.json.x1y2.tmp").write_text("{")
    (d / "model.tmp4242").mkdir()
    (d / "model.tmp4242" / "adapter_model.safetensors").write_bytes(b"half")
    (d / "checkpoint.tmp").mkdir()
    logs = []
    run_stage("s", d, config={}, body=lambda d: None, log=logs.append)
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "rows.jsonl"]
    assert any("removed 3 temporary file(s)" in m for m in logs)
