"""Report tables and plots on hand-made evaluation results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctfreid.eval import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results():
    def m(r1, r5, mAP, ms):
        return {"rank1": r1, "rank5": r5, "rank10": r5, "mAP": mAP, "query_ms": ms}

    return {
        "methods": {
            "ctf": m(0.90, 0.95, 0.80, 0.5),
            "hash2048": m(0.91, 0.96, 0.82, 4.0),
            "hash32": m(0.40, 0.60, 0.30, 0.25),
            "float": m(0.93, 0.97, 0.85, 20.0),
            "hash128": m(0.80, 0.90, 0.70, 1.0),
        },
        "ctf_thresholds": {"32": 9, "128": 41},
        "skipped_queries": 2,
    }


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    # IHDR: width and height are the big-endian uint32s at bytes 16..24
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_table_rows_order_percent_and_speedup():
    rows = report.table_rows(_results())
    assert [r["method"] for r in rows] == ["float", "hash32", "hash128", "hash2048", "ctf"]
    by = {r["method"]: r for r in rows}
    assert by["ctf"]["rank1"] == pytest.approx(90.0)
    assert by["ctf"]["mAP"] == pytest.approx(80.0)
    # speed-up over the longest code: 4.0 ms / method ms
    assert by["ctf"]["speedup"] == pytest.approx(8.0)
    assert by["hash32"]["speedup"] == pytest.approx(16.0)
    assert by["hash2048"]["speedup"] == pytest.approx(1.0)
    assert by["float"]["speedup"] == pytest.approx(0.2)


def test_markdown_and_text_tables():
    from ctfreid.eval.evaluate import format_table

    md = report.format_markdown(_results())
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 5
    assert "speed-up vs 2048-bit" in lines[0]
    assert lines[-1].startswith("| CtF") and "90.0" in lines[-1] and "8.0x" in lines[-1]
    # the one terminal table (the CLI's and the demo's)
    txt = format_table(_results()).splitlines()
    assert "speed-up vs hash2048" in txt[0]
    by = {line.split()[0]: line for line in txt[2:7]}
    assert set(by) == {"ctf", "hash2048", "hash32", "float", "hash128"}
    assert by["hash32"].split()[1] == "40.0%" and by["hash32"].endswith("16.0x")
    assert by["ctf"].endswith("8.0x") and by["float"].endswith("0.2x")


def test_method_keys_one_helper():
    assert [report.method_key(L) for L in (32, 2048)] == ["hash32", "hash2048"]
    for L in (32, 64, 2048):
        assert report.parse_method(report.method_key(L)) == L
    for key in ("float", "ctf", "hash", "hashx", "hash-32", "Hash32", 32):
        assert report.parse_method(key) is None
    assert report.method_label("hash128") == "128-bit" and report.method_label("ctf").startswith("CtF")


def test_write_tables(tmp_path):
    j, m = report.write_tables(_results(), tmp_path, extra={"config": {"beta": 2.0, "np": np.int64(3)}})
    doc = json.loads(j.read_text())
    assert set(doc) == {"table", "evaluation", "config"}
    assert doc["table"][-1]["method"] == "ctf" and doc["config"]["np"] == 3
    assert set(doc["table"][0]) == {"method", "label", "rank1", "rank5", "mAP", "query_ms", "speedup"}
    text = m.read_text()
    assert "t32=9" in text and "2 queries" in text and "| CtF" in text


def test_bad_results_are_clear():
    with pytest.raises(ValueError, match="methods"):
        report.table_rows({"rows": []})
    with pytest.raises(ValueError, match="lacks"):
        report.table_rows({"methods": {"ctf": {"rank1": 1.0}}})


def test_beta_sweep_plot(tmp_path):
    rows = [{"beta": b, "rank1": 0.5 + 0.04 * i, "mAP": 0.3 + 0.05 * i, "query_ms": 0.2 + 0.3 * i}
            for i, b in enumerate([0.01, 0.1, 1, 10])]
    ref = dict(_results()["methods"]["hash2048"], label="2048-bit alone")
    p = report.plot_beta_sweep(rows, tmp_path / "beta.png", reference=ref, beta=2.0)
    w, h = _png_size(p)
    assert w > 500 and h > 200
    with pytest.raises(ValueError, match="> 0"):
        report.plot_beta_sweep([{"beta": 0, "rank1": 1, "mAP": 1, "query_ms": 1}], tmp_path / "x.png")


def test_gallery_size_plot(tmp_path):
    rows = []
    for n in [100, 300, 1000, 3000]:
        res = _results()
        for v in res["methods"].values():
            v["query_ms"] *= n / 100
        rows.append({"gallery_size": n, **res})
    p = report.plot_gallery_size(rows, tmp_path / "gallery.png")
    assert _png_size(p)[0] > 500


def test_ranked_list_items_follow_protocol():
    # query pid 5, camera 1; gallery: 0 same pid same cam (removed), 1 junk (removed), 2 distractor (wrong),
    # 3 same pid other cam (right), 4 other pid (wrong)
    g_pids = np.array([5, -1, 0, 5, 7])
    g_cams = np.array([1, 2, 2, 2, 1])
    ranking = np.array([0, 1, 2, 3, 4, -1])
    items = report.ranked_list_items(ranking, 5, 1, g_pids, g_cams, k=10)
    assert items == [(2, False), (3, True), (4, False)]
    assert report.ranked_list_items(ranking, 5, 1, g_pids, g_cams, k=2) == [(2, False), (3, True)]


def test_ranked_list_items_open_search():
    # searching images of unknown identity: nothing removed; right/wrong only when both pids are known
    g_pids = np.array([5, -1, 0, 5, 7])
    g_cams = np.array([1, 2, 2, 2, 1])
    ranking = np.array([0, 1, 2, 3, 4, -1])
    assert report.ranked_list_items(ranking, 5, 1, g_pids, g_cams, protocol=False) == [
        (0, True), (1, None), (2, False), (3, True), (4, False)]
    assert report.ranked_list_items(ranking, -1, -1, g_pids, g_cams, k=3, protocol=False) == [
        (0, None), (1, None), (2, None)]


def test_ranked_lists_plot(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    g_pids, g_cams = np.array([1, 2, 1, 0, 2]), np.array([2, 2, 1, 3, 1])
    rankings = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    dists = np.array([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    out = report.plot_ranked_lists(tmp_path / "ranked.png", [paths[5], "missing.jpg"], [1, 2], [1, 1],
                                   paths[:5], g_pids, g_cams, rankings, dists, k=4)
    w, h = _png_size(out)
    assert w > h > 100
