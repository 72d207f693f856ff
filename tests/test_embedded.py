"""The embedded database's folder: fluxrt takes over only a folder of its own."""

from __future__ import annotations

import pytest

from fluxrt_trio.postgres.embedded import EmbeddedError, EmbeddedPostgres


def test_a_folder_holding_other_files_is_refused_and_left_as_it_was(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("mine")
    mode = project.stat().st_mode
    with pytest.raises(EmbeddedError, match=r"holds other files \(README.md\); point database.embedded at a folder"):
        EmbeddedPostgres(project).start()
    assert project.stat().st_mode == mode and project.stat().st_uid == tmp_path.stat().st_uid
    assert [p.name for p in project.iterdir()] == ["README.md"]
