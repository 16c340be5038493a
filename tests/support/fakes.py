"""Small fakes and readers the tests share: a SavedModel folder without TensorFlow, the Asset
events a DAG run published, a labelImg export that landed at a given time."""

from __future__ import annotations

import os
from pathlib import Path


def fake_saved_model(path: Path, tag: str, label_map: str | None = "item { id: 1 name: 'a' }"):
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"graph-" + tag.encode())
    (path / "variables" / "variables.index").write_bytes(b"index-" + tag.encode())
    (path / "variables" / "variables.data-00000-of-00001").write_bytes(b"\0" * 1000)
    if label_map is not None:
        (path / "assets.extra").mkdir()
        (path / "assets.extra" / "label_map.pbtxt").write_text(label_map)
    return path


def asset_events(run_id: str) -> dict[str, dict]:
    """{source task id: event extra} of the Asset events a run published."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == run_id))
        return {e.source_task_id: dict(e.extra) for e in events}


def promoted_fakes(tmp_path: Path, serving: Path, options, count: int = 2) -> None:
    """Versions 1..count of `shapes`, each a fake SavedModel pushed and promoted to stable."""
    from odapi_operators.core.serving.promote import promote
    from odapi_operators.core.serving.push import push

    for i in range(1, count + 1):
        push(fake_saved_model(tmp_path / f"e{i}", str(i)), serving, "shapes", f"r{i}",
             options=options)
        promote(serving, "shapes", i, options=options)


def voc_export(folder: Path, landed: float, images: dict[str, list[tuple]],
               deleted: list[str] | None = None) -> Path:
    """A labelImg export (a JPEG and a Pascal VOC XML per image, _SUCCESS last) that landed
    at `landed`; `images` maps a file name to its boxes (label, xmin, ymin, xmax, ymax)."""
    from PIL import Image

    folder.mkdir(parents=True)
    for name, boxes in images.items():
        Image.new("RGB", (120, 90), (200, 180, 40)).save(folder / name, "JPEG")
        objects = "".join(
            f"<object><name>{label}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for label, x0, y0, x1, y1 in boxes)
        (folder / name).with_suffix(".xml").write_text(
            f"<annotation><folder>photos</folder><filename>{name}</filename>"
            f"<path>C:\\Users\\ann\\photos\\{name}</path><size><width>120</width>"
            f"<height>90</height><depth>3</depth></size>{objects}</annotation>")
    if deleted is not None:
        (folder / "deleted.txt").write_text("".join(f"{line}\n" for line in deleted))
    (folder / "_SUCCESS").write_text("")
    os.utime(folder / "_SUCCESS", (landed, landed))
    return folder
