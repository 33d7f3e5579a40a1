"""CRIU's logs as the runc backend reports them: the error lines, the copy that outlives the
work dir, and the message a client gets."""

from __future__ import annotations

from pathlib import Path

from shim.runtimes import criu

DUMP_LOG = """\
(00.000046) Version: 3.17.1 (gitid 0)
(05.413673) Dumping netns links
(05.431092) Error (criu/libnetlink.c:54): -22 reported by netlink: Invalid argument
(05.440000) pie: 7: Error (criu/pie/parasite.c:12): parasite says no
(05.453257) Error (criu/namespaces.c:1171): Namespaces dumping finished with error 59904
(05.454631) Unlock network
(05.792006) Error (criu/cr-dump.c:2053): Dumping FAILED.
"""


def test_log_errors_are_the_last_error_lines_without_timestamps(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(DUMP_LOG)
    assert criu.log_errors(str(log)) == [
        "Error (criu/pie/parasite.c:12): parasite says no",
        "Error (criu/namespaces.c:1171): Namespaces dumping finished with error 59904",
        "Error (criu/cr-dump.c:2053): Dumping FAILED.",
    ]


def test_a_missing_log_has_no_errors(tmp_path: Path) -> None:
    assert criu.log_errors(str(tmp_path / "absent.log")) == []


def test_keep_log_copies_into_the_first_directory_that_takes_it(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(DUMP_LOG)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    kept = criu.keep_log(str(log), [str(tmp_path / "no" / "such" / "dir"), str(bundle)])
    assert kept == str(bundle / criu.KEPT_DUMP_LOG)
    assert Path(kept).read_text() == DUMP_LOG
    assert criu.keep_log(str(tmp_path / "absent.log"), [str(bundle)]) is None


def test_failure_message_has_runc_s_first_line_criu_s_errors_and_the_log() -> None:
    message = criu.describe_failure(
        "criu failed: type NOTIFY errno 0\nlog file: /w/dump.log", ["Error (x.c:1): no"], "/b/l"
    )
    assert message == "criu failed: type NOTIFY errno 0, CRIU: Error (x.c:1): no, log: /b/l"
    assert criu.describe_failure("", [], None) == "unknown error"
