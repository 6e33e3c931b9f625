"""``adapterswap score --metric identity-dlib`` on the real photos, through the installed
plugin: the same person scores above 0.4, another person below, the photo without a face is
missing and counted."""

from __future__ import annotations

import json

from adapterswap_face.identity import SAME_PERSON_SCORE
from click.testing import CliRunner
from face_samples import DEGRADATIONS

from adapterswap.cli import main


def test_score_command_on_real_photos(tmp_path, face_photos):
    reference = tmp_path / "astronaut.png"
    face_photos["astronaut"].save(reference)
    folder = tmp_path / "out"
    folder.mkdir()
    DEGRADATIONS["flip"](face_photos["astronaut"]).save(folder / "a-flipped.png")
    face_photos["grace_hopper"].save(folder / "b-hopper.jpg")
    face_photos["coffee"].save(folder / "c-coffee.png")
    runner = CliRunner()

    result = runner.invoke(main, ["score", "--metric", "identity-dlib", "--ref", str(reference),
                                  str(folder), "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["image"] for row in rows] == [
        str(folder / name) for name in ("a-flipped.png", "b-hopper.jpg", "c-coffee.png")]
    assert {row["metric"] for row in rows} == {"identity-dlib"}
    flipped, hopper, cup = (row["score"] for row in rows)
    assert flipped > SAME_PERSON_SCORE > hopper
    assert cup is None and rows[2]["reason"] == "image: no face found"
    assert rows[0]["reason"] is None and rows[1]["reason"] is None

    text = runner.invoke(main, ["score", "--metric", "identity-dlib", "--ref", str(reference),
                                str(folder)])
    assert text.exit_code == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"{folder / 'a-flipped.png'}  {flipped:.4f}"
    assert lines[2] == f"{folder / 'c-coffee.png'}  missing (image: no face found)"
    assert lines[-1].startswith("identity-dlib: 2 scored, 1 missing, mean "
                                f"{(flipped + hopper) / 2:.4f}")


def test_score_command_reference_without_face_is_missing_for_every_image(tmp_path, face_photos):
    reference = tmp_path / "coffee.png"
    face_photos["coffee"].save(reference)
    image = tmp_path / "astronaut.png"
    face_photos["astronaut"].save(image)
    result = CliRunner().invoke(main, ["score", "--metric", "identity-dlib", "--ref",
                                       str(reference), str(image)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{image}  missing (reference: no face found)",
        "identity-dlib: 0 scored, 1 missing, no mean"]
