"""A prompt-file run's manifest and rows as untrusted input: a bad line is skipped with a note,
never a traceback; the manifest is a regular file inside --out; rows are checked whole first;
a run that paints nothing leaves no folder."""

import pytest

from ccld.apps.cli import main
from ccld.io import jsontext

FAST = ["--steps", "1", "--width", "64", "--height", "64", "-q"]


def run(tmp_path, model_flags, rows: str, out=None):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(rows)
    out = out or tmp_path / "out"
    return main(["generate", "--prompts-file", str(prompts), "--out", str(out), *FAST,
                 *model_flags]), out


def pictures(out):
    return sorted(p.name for p in out.glob("*.png"))


@pytest.mark.parametrize("bad_line", [
    '{"file": "x.png", "row": "0", "key": 5, "index": null}',  # wrong types
    '{"file": "x.png", "row": 0, "key": "k", "index": 1' + "0" * 5000 + "}",  # 5000 digits
    "[" * 50000 + "]" * 50000,  # nested past any parser's recursion
    '["a list, not an entry"]',
    "\xff\xfe not text",
])
def test_a_malformed_manifest_line_is_skipped_with_a_note(tmp_path, model_flags, capsys, bad_line):
    status, out = run(tmp_path, model_flags, "a castle\na lighthouse\n")
    assert status == 0
    first = pictures(out)
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(bad_line.encode("utf-8", "surrogateescape") + b"\n")
    capsys.readouterr()
    status, _ = run(tmp_path, model_flags, "a castle\na lighthouse\n")
    err = capsys.readouterr().err
    assert status == 0 and "Traceback" not in err
    assert "skipped 1 line(s) that are not entries ccld writes" in err
    assert pictures(out) == first  # nothing was painted again: both rows were recorded
    assert "nothing to paint" in err


def test_a_manifest_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, model_flags,
                                                                          capsys):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not yours\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to(outside)
    status, _ = run(tmp_path, model_flags, "a castle\n", out)
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0
    assert "manifest.jsonl: a symlink; the manifest is a regular file inside --out" in err
    assert outside.read_text() == "not yours\n" and not list(out.glob("*.png"))


def test_a_run_that_fails_before_its_first_picture_leaves_no_folder(tmp_path, model_flags,
                                                                    monkeypatch, capsys):
    import ccld.pipeline.scheduling
    from ccld import CCLDError

    def fails(*args, **kwargs):
        raise CCLDError("sampling step 1 of 1 went non-finite")

    monkeypatch.setattr(ccld.pipeline.scheduling, "sample", fails)
    status, out = run(tmp_path, model_flags, "a castle\n")
    assert status == 2 and "went non-finite" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("row, message", [
    ('{"prompts": ' + "[" * 100000 + "]" * 100000 + "}", "nested 100001 levels deep (at most 32)"),
    ('{"prompts": ["a"], "seed": 1' + "0" * 5000 + "}", "a number of 5001 digits (at most 40)"),
    ('{"prompts": ["a"], "n": "3.0"}', "n must be a whole number from 1 to 1000000, not a str"),
    ('{"prompts": ["a"], "steps": NaN}', "NaN is not JSON"),
    ('{"prompts": ["a"], "seed": 1, "seed": 2}', "the key 'seed' is given twice"),
    ('{"prompts": ["a"], "picture": 0}', "picture"),
])
def test_a_bad_row_is_one_line_before_anything_is_painted(tmp_path, model_flags, capsys, row,
                                                          message):
    status, out = run(tmp_path, model_flags, "a good row first\n" + row + "\n")
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "line 2" in err and message in err
    assert not out.exists()


def test_json_depth_is_counted_outside_strings():
    assert jsontext.nesting_depth('{"a": "[[[[[[", "b": [[1]]}') == 3
    with pytest.raises(jsontext.JSONInputError, match="nested 40 levels deep"):
        jsontext.parse("[" * 40 + "]" * 40)
    assert jsontext.parse('{"seed": 18446744073709551615}') == {"seed": 2 ** 64 - 1}
