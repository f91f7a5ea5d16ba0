"""Turn the browser test's screenshots of the shipped workflows into the Templates dialog's thumbnails.

    python -m pytest tests/test_browser_e2e.py -k readable   # writes test-artifacts/thumb_<name>.png
    python tools/make_thumbnails.py                          # writes workflows/<name>.jpg

The thumbnails sit beside the workflows, where ComfyUI (custom_nodes/<pack>/workflows/) and
`sdxl-nodes serve` both serve them as /api/workflow_templates/<pack>/<name>.jpg.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 400  # the dialog shows cards about 225 px wide; 400 keeps them sharp on a 2× display
QUALITY = 80


def main() -> None:
    for workflow in sorted((ROOT / "workflows").glob("*.json")):
        shot = ROOT / "test-artifacts" / f"thumb_{workflow.stem}.png"
        if not shot.is_file():
            raise SystemExit(f"{shot} is missing: run `python -m pytest tests/test_browser_e2e.py -k readable` first")
        with Image.open(shot) as im:
            im = im.convert("RGB")
            im = im.resize((WIDTH, round(im.height * WIDTH / im.width)), Image.LANCZOS)
            out = workflow.with_suffix(".jpg")
            im.save(out, "JPEG", quality=QUALITY, optimize=True, progressive=True)
        print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KiB, {im.width}×{im.height})")


if __name__ == "__main__":
    main()
