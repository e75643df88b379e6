"""The explorer's Datasets page and its API against a real server: a folder of generated images (chosen as a folder,
and dropped as a real folder with Chromium's own drag events; uploaded as single files) and a zip (dropped) through
the gateway, with the progress bar, the report (a skipped
text file by name, a converted grayscale image), and delete; the uploads follow the model uploads' rules (auth,
read-only tokens, the size bound, the digest). Images are real files written by Pillow."""

from __future__ import annotations

import hashlib
import json

import pytest
from support.fake_worker import FakeWorker
from support.images import image_bytes
from support.images import zip_of
from web_support import Http
from web_support import drop_files

from featureviz.client import Client
from featureviz.server import Limits
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background

TOKENS = {"w": "alice", "r": "alice", "b": "bob"}


def _images() -> dict[str, bytes]:
    """Three RGB PNGs, a grayscale JPEG in a sub-folder, and a text file the set skips."""
    files = {f"img{i}.png": image_bytes("png", (24, 16), color=color)
             for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)])}
    files["sub/gray.jpg"] = image_bytes("jpeg", (20, 20), mode="L", color=(90,))
    files["notes.txt"] = b"not an image"
    return files


def _files_body(files: dict[str, bytes]) -> tuple[str, bytes]:
    """The gateway's files upload: the query and the body (the files' JSON list, then their bytes)."""
    manifest = json.dumps([{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                           for n, d in files.items()]).encode()
    stream = b"".join(files.values())
    query = f"api/datasets?name=set&kind=files&manifest={len(manifest)}&sha256={hashlib.sha256(stream).hexdigest()}"
    return query, manifest + stream


def _set_id(files: dict[str, bytes]) -> str:
    shas = sorted(hashlib.sha256(d).hexdigest() for n, d in files.items() if not n.endswith(".txt"))
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    config = ServerConfig(tmp_path_factory.mktemp("store"), tokens=TOKENS, read_only={"r"}, http_port=0,
                          limits=Limits(max_dataset_bytes=200_000))
    running = serve_in_background(config)
    yield running
    running.stop()


# ----------------------------------------------------------------------------------------------------------- API


def test_a_files_upload_and_a_zip_answer_the_stored_set_and_its_report(token_server):
    http = Http(token_server.http_url, token="w")
    files = _images()
    query, body = _files_body(files)
    status, data = http.json("POST", query, body, {"Content-Type": "application/octet-stream"})
    assert status == 200, data
    assert data["id"] == _set_id(files) and data["name"] == "set" and data["image_count"] == 4
    assert data["deduplicated"] is False
    report = data["report"]
    assert (report["images"], report["files"], report["skipped"]) == (4, 5, 1)
    assert report["skipped_by_cause"] == [{"cause": "not_an_image", "count": 1, "names": ["notes.txt"],
                                           "detail": report["skipped_by_cause"][0]["detail"]}]
    assert report["converted"] == [{"kind": "grayscale", "count": 1, "names": ["sub/gray.jpg"]}]
    assert report["formats"] == {"jpeg": 1, "png": 3}

    status, again = http.json("POST", query, body)  # the same set: deduplicated
    assert status == 200 and again["id"] == data["id"] and again["deduplicated"] is True

    archive = zip_of({"a.png": image_bytes("png", (8, 8), color=(1, 2, 3)), "readme.md": b"# hi"})
    status, zipped = http.json("POST", f"api/datasets?name=z.zip&kind=zip&sha256={hashlib.sha256(archive).hexdigest()}",
                               archive)
    assert status == 200, zipped
    assert zipped["image_count"] == 1 and zipped["report"]["skipped_by_cause"][0]["names"] == ["readme.md"]

    status, listed = http.json("GET", "api/datasets")
    assert status == 200
    assert sorted(d["id"] for d in listed["datasets"]) == sorted([data["id"], zipped["id"]])
    by_id = {d["id"]: d for d in listed["datasets"]}
    assert by_id[data["id"]]["report"]["skipped_by_cause"][0]["names"] == ["notes.txt"]  # the whole report
    status, got = http.json("GET", f"api/datasets/{data['id']}")
    assert status == 200 and got["report"] == report

    bob = Http(token_server.http_url, token="b")
    assert bob.json("GET", f"api/datasets/{data['id']}")[0] == 404
    assert bob.json("GET", "api/datasets") == (200, {"datasets": []})
    assert bob.json("DELETE", f"api/datasets/{data['id']}")[0] == 404

    for ident in (data["id"], zipped["id"]):
        assert http.json("DELETE", f"api/datasets/{ident}") == (200, {})
    assert http.json("GET", "api/datasets") == (200, {"datasets": []})


def test_a_dataset_upload_follows_the_model_uploads_rules(token_server):
    files = _images()
    query, body = _files_body(files)
    viewer = Http(token_server.http_url, token="r")
    status, data = viewer.json("POST", query, body)
    assert status == 403 and data["error"]["reason"] == "READ_ONLY_TOKEN"
    assert "uploading a dataset" in data["error"]["message"]
    assert Http(token_server.http_url).json("POST", query, body)[0] == 401

    http = Http(token_server.http_url, token="w")
    big = b"\0" * 200_001
    status, data = http.json("POST", f"api/datasets?kind=zip&sha256={'0' * 64}", big)
    assert status == 413 and "200000 bytes (max_dataset_bytes)" in data["error"]["message"]

    status, data = http.json("POST", f"api/datasets?kind=rar&sha256={'0' * 64}", b"x")
    assert status == 400 and data["error"]["field_violations"][0][0] == "kind"
    status, data = http.json("POST", query.replace("&manifest=", "&manifest=x"), body)
    assert status == 400 and data["error"]["field_violations"][0][0] == "manifest"
    status, data = http.json("POST", f"api/datasets?kind=files&manifest=5&sha256={'0' * 64}", b"[1,2]abc")
    assert status == 400 and data["error"]["field_violations"][0][0] == "manifest[0]"
    status, data = http.json("POST", "api/datasets?kind=zip", b"PK\x03\x04")
    assert status == 400 and "sha256" in data["error"]["message"]

    wrong = query.split("&sha256=")[0] + "&sha256=" + "f" * 64
    status, data = http.json("POST", wrong, body)
    assert status == 400 and data["error"]["reason"] == "DIGEST_MISMATCH"
    no_image = {"notes.txt": b"not an image"}
    status, data = http.json("POST", *_files_body(no_image))
    assert status == 400 and data["error"]["reason"] == "EMPTY_DATASET"
    with Client(token_server.address, token="w") as fv:  # nothing kept: no set, no partial upload
        assert list(fv.datasets()) == []
        stream = b"".join(files.values())
        assert fv.dataset_upload_status(hashlib.sha256(stream).hexdigest(), len(stream)).committed_bytes == 0


# ------------------------------------------------------------------------------------------------------- browser


def _watch_bar(page) -> None:
    """Record every width the upload's progress bar is given."""
    page.evaluate("""() => {
        window.widths = [];
        const fill = document.querySelector('.upload-status .bar > span');
        new MutationObserver(() => window.widths.push(fill.style.width))
            .observe(fill, {attributes: true, attributeFilter: ['style']});
    }""")


def _bar_reached_the_end(page) -> None:
    widths = [w for w in page.evaluate("window.widths") if w]
    assert widths and widths[-1] == "100%", widths
    numbers = [float(w.rstrip("%")) for w in widths]
    assert numbers[1:] == sorted(numbers[1:]), widths  # after the reset to 0 it only grows
    assert page.eval_on_selector(".upload-status .bar", "el => el.classList.contains('done')")


def test_a_folder_uploads_as_single_files_shows_its_report_and_deletes(page, web_server, tmp_path):
    files = _images()
    folder = tmp_path / "photos"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    page.goto("/#/datasets")
    page.wait_for_selector("#dataset-dropzone")
    page.wait_for_selector("#dataset-list .empty")
    _watch_bar(page)
    page.set_input_files("#dataset-folder", str(folder))  # the folder chooser, as a person picks a folder
    page.wait_for_selector(".upload-status.done")
    assert page.inner_text(".upload-line") == "Uploaded photos: 4 images, 1 file skipped."
    _bar_reached_the_end(page)

    ident = _set_id(files)
    card = page.wait_for_selector(f".dataset[data-id='{ident}']")
    assert card.query_selector("h3").inner_text() == "photos"
    assert card.query_selector("dd.images").inner_text() == "4 of 5 files"
    skipped = card.query_selector("li.skipped[data-cause='not_an_image']").inner_text()
    assert skipped.startswith("1 skipped: not an image — notes.txt")
    assert card.query_selector("li.converted[data-kind='grayscale']").inner_text() == \
        "1 converted from grayscale — sub/gray.jpg"
    with Client(web_server.address) as fv:
        assert [i.name for i in fv.dataset_images(ident)] == ["img0.png", "img1.png", "img2.png", "sub/gray.jpg"]
        assert fv.dataset(ident).display_name == "photos"

    delete = card.query_selector("button.danger")
    delete.click()
    assert delete.inner_text() == "Really delete?"  # a second click confirms
    delete.click()
    page.wait_for_selector(f".dataset[data-id='{ident}']", state="detached")
    with Client(web_server.address) as fv:
        assert ident not in [d.id for d in fv.datasets()]


def _drag_and_drop_paths(page, selector: str, paths: list[str]) -> None:
    """A real drag and drop of files or folders from the file system onto an element: Chromium's own drag events
    (DevTools' Input.dispatchDragEvent), so a folder arrives as a directory entry the page walks."""
    box = page.locator(selector).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    session = page.context.new_cdp_session(page)
    data = {"items": [], "files": paths, "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        session.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})


def test_a_dropped_folder_is_walked_and_sent_as_single_files_by_their_paths_inside_it(page, web_server, tmp_path):
    files = _images()
    folder = tmp_path / "holiday"
    for name, data in {**files, ".hidden.png": image_bytes("png", (5, 5))}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    page.goto("/#/datasets")
    page.wait_for_selector("#dataset-list :is(.empty, .dataset)")
    _drag_and_drop_paths(page, "#dataset-dropzone", [str(folder)])
    page.wait_for_selector(".upload-status.done")
    assert page.inner_text(".upload-line") == "Uploaded holiday: 4 images, 1 file skipped."
    ident = _set_id(files)
    page.wait_for_selector(f".dataset[data-id='{ident}']")
    with Client(web_server.address) as fv:  # hidden files left out, as the clients do
        assert [i.name for i in fv.dataset_images(ident)] == ["img0.png", "img1.png", "img2.png", "sub/gray.jpg"]
        assert fv.dataset(ident).report.files == 5
        fv.delete_dataset(ident)


def test_a_dropped_zip_and_dropped_files_upload_with_their_reports(page, web_server):
    images = {"a.png": image_bytes("png", (8, 8), color=(1, 2, 3)), "b.png": image_bytes("png", (9, 9))}
    archive = zip_of({**images, "readme.md": b"# not an image"})
    page.goto("/#/datasets")
    page.wait_for_selector("#dataset-list :is(.empty, .dataset)")
    _watch_bar(page)
    drop_files(page, "#dataset-dropzone", {"set.zip": archive})
    page.wait_for_selector(".upload-status.done")
    assert page.inner_text(".upload-line") == "Uploaded set.zip: 2 images, 1 file skipped."
    _bar_reached_the_end(page)
    ident = _set_id(images)
    card = page.wait_for_selector(f".dataset[data-id='{ident}']")
    assert "readme.md" in card.query_selector("li.skipped[data-cause='not_an_image']").inner_text()

    # the same images dropped as files: the same set, which the tenant holds already
    drop_files(page, "#dataset-dropzone", images)
    page.wait_for_selector(".upload-line:text-matches('already here')")
    assert page.inner_text(".upload-line") == "set.zip was already here (the same images)."
    assert len(page.query_selector_all(".dataset")) == 1
    with Client(web_server.address) as fv:
        fv.delete_dataset(ident)


def test_an_upload_the_server_refuses_shows_its_one_line(page, web_server):
    page.goto("/#/datasets")
    page.wait_for_selector("#dataset-dropzone")
    drop_files(page, "#dataset-dropzone", {"notes.txt": b"just text"})
    alert = page.wait_for_selector("[role=alert]")
    assert alert.inner_text().startswith("INVALID_ARGUMENT")
    assert "image" in alert.inner_text()
    assert page.is_hidden(".upload-status")


# ------------------------------------------------------------------------------------ a set in use by a job


def test_deleting_a_set_a_running_job_reads_shows_the_one_line_and_keeps_it(browser, tmp_path):
    fake = FakeWorker()  # it answers an index job's admission as the real worker does, and holds the job
    running = serve_in_background(ServerConfig(tmp_path / "store", http_port=0), worker=fake)
    context = browser.new_context(base_url=running.http_url)
    try:
        with Client(running.address) as fv:
            model = fv.upload(b"a model the scripted worker takes")
            archive = zip_of({"a.png": image_bytes("png", (8, 8))})
            dataset = fv.upload_dataset(archive, name="busy")
            job = fv.index_exemplars(model.sha256, dataset.id, ["conv"])
            page = context.new_page()
            page.goto("/#/datasets")
            delete = page.wait_for_selector(f".dataset[data-id='{dataset.id}'] button.danger")
            delete.click()
            delete.click()
            alert = page.wait_for_selector(f".dataset[data-id='{dataset.id}'] [role=alert]")
            text = alert.inner_text()
            assert text.startswith("FAILED_PRECONDITION") and f"jobs/{job.id}" in text
            assert "\n" not in text.strip()  # one line
            assert fv.dataset(dataset.id).id == dataset.id  # kept
    finally:
        context.close()
        running.stop()
