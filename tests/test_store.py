"""The store's protocol without CLIP: vectors in, the mirror equal to Chroma after every kind of write,
refused writes changing nothing, and a mirror rebuilt in server mode while writes and searches go on."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ChromaServer, free_port

import store
from catalog import RECENT_FIELDS, Catalog, _rows_to_read
from columns import ABSENT, FieldColumn, read_column
from config import Settings
from errors import StoreError
from filters import parse_filter
from store import StoreView, VectorStore, lock_database

DIM = 8
MODEL = "test-model"


def records(prefix: str, count: int, seed: int) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"{prefix}-{i}" for i in range(count)]
    metadatas = [
        {"path": f"{image}.jpg", "group": i % 3, "tags": ["x", f"t{i}"]} for i, image in enumerate(ids)
    ]
    return ids, vectors, metadatas


class Vector:
    """A stored vector that equals another within float32 precision (a server sends them as text)."""

    def __init__(self, values: Any) -> None:
        self.values = np.asarray(values, dtype=np.float64)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vector) and np.allclose(self.values, other.values, atol=1e-6)

    def __repr__(self) -> str:
        return f"Vector({np.round(self.values, 6).tolist()})"


def open_store(settings: Settings, **options: Any) -> VectorStore:
    return VectorStore(settings, MODEL, DIM, lock=lock_database(settings, "test"), **options)


def chroma_state(store: VectorStore) -> dict[str, tuple[Vector, dict[str, Any]]]:
    stored = store.view().collection.get(include=["embeddings", "metadatas"])
    return {
        image_id: (Vector(vector), metadata)
        for image_id, vector, metadata in zip(
            stored["ids"], stored["embeddings"], stored["metadatas"], strict=True
        )
    }


def mirror_state(store: VectorStore) -> dict[str, tuple[Vector, dict[str, Any]]]:
    return {image_id: (Vector(store.vector(image_id)), metadata) for image_id, metadata in store.items()}


@pytest.fixture
def embedded(tmp_path: Path) -> Settings:
    return Settings(DATASET_FOLDER=str(tmp_path), CHROMA_DB_PATH=str(tmp_path / "db"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    chroma = ChromaServer(tmp_path_factory.mktemp("chroma"), free_port())
    chroma.start()
    yield chroma
    chroma.stop()


def server_settings(server: ChromaServer, tmp_path: Path, name: str) -> Settings:
    return Settings(
        DATASET_FOLDER=str(tmp_path),
        CHROMA_HOST=server.host,
        CHROMA_PORT=server.port,
        COLLECTION_NAME=name,
        MIRROR_FOLDER=str(tmp_path / "mirror"),
    )


def test_mirror_equals_chroma_after_write_update_delete_and_reopen(embedded):
    ids, vectors, metadatas = records("img", 300, seed=1)
    with open_store(embedded) as store:
        store.write(ids, vectors, metadatas)
        renamed = [{"path": f"{image}.jpg", "group": 7} for image in ids[:50]]  # tags dropped
        store.update_metadata(ids[:50], renamed)
        store.write(ids[250:260], vectors[:10], metadatas[250:260])  # replaced vectors
        store.delete(ids[100:120])
        assert store.metadata(ids[0]) == {"path": "img-0.jpg", "group": 7}
        assert ids[100] not in store and len(store) == store.stored_count() == 280
        assert mirror_state(store) == chroma_state(store)
        before = mirror_state(store)
    with open_store(embedded) as reopened:
        assert mirror_state(reopened) == chroma_state(reopened) == before


def test_a_write_chroma_refuses_changes_nothing(embedded):
    ids, vectors, metadatas = records("img", 20, seed=2)
    with open_store(embedded) as store:
        store.write(ids, vectors, metadatas)
        stamp, before, stored = store.view().stamp, mirror_state(store), chroma_state(store)
        with pytest.raises(ValueError):
            store.write(["new", ids[0]], vectors[:2], [{"path": "n.jpg"}, {"path": {"nested": "no"}}])
        with pytest.raises(ValueError):
            store.update_metadata([ids[1]], [{"path": {"nested": "no"}}])
        assert mirror_state(store) == before and chroma_state(store) == stored
        assert store.view().stamp == stamp == store.recorded()["stamp"]


def test_each_write_gives_the_collection_and_the_mirror_a_new_stamp(embedded):
    ids, vectors, metadatas = records("img", 10, seed=3)
    with open_store(embedded) as store:
        seen = {store.view().stamp}
        for write in (
            lambda: store.write(ids, vectors, metadatas),
            lambda: store.update_metadata(ids[:2], metadatas[:2]),
            lambda: store.delete(ids[:1]),
        ):
            write()
            assert store.view().stamp == store.recorded()["stamp"] not in seen
            seen.add(store.view().stamp)


def test_readers_skip_ids_the_mirror_lacks(embedded):
    ids, vectors, metadatas = records("img", 30, seed=4)
    with open_store(embedded) as store:
        store.write(ids, vectors, metadatas)
        view = store.view()
        view.collection.upsert(
            ids=["behind-the-mirror"], embeddings=vectors[:1], metadatas=[{"path": "b.jpg"}]
        )
        found = view.nearest(vectors[0], 31, store.settings)
        assert "behind-the-mirror" not in found and found[0] == ids[0] and set(found) <= set(ids)


def wait_for(condition: Any, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class GatedStore(VectorStore):
    """A store whose mirror rebuild waits, after reading Chroma, until the test lets it finish."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.read_done = threading.Event()
        self.may_finish = threading.Event()
        self.may_finish.set()
        super().__init__(*args, **kwargs)

    def _read_view(self, collection: Any) -> StoreView:
        view = super()._read_view(collection)
        self.read_done.set()
        assert self.may_finish.wait(60)
        return view


def test_server_mode_rebuild_racing_writes_loses_nothing_and_searches_keep_working(
    server, tmp_path, monkeypatch
):
    monkeypatch.setattr(store, "STALE_CHECK_SECONDS", 0.0)  # check the stamp at every call
    settings = server_settings(server, tmp_path, "race")
    ids, vectors, metadatas = records("api", 200, seed=5)
    other_ids, other_vectors, other_metadatas = records("other", 50, seed=6)
    with GatedStore(settings, MODEL, DIM) as api, VectorStore(settings, MODEL, DIM) as other:
        api.write(ids[:100], vectors[:100], metadatas[:100])
        other.write(other_ids, other_vectors, other_metadatas)  # another process: api's mirror is stale
        old_catalog = api.view().catalog
        api.may_finish.clear()
        api.read_done.clear()
        api.refresh_if_stale(wait=False)
        assert api.read_done.wait(60)  # the new mirror is read; now write while it is not swapped in yet
        api.write(ids[100:], vectors[100:], metadatas[100:])
        api.update_metadata(ids[:5], [{"path": "renamed.jpg"}] * 5)
        api.delete(ids[5:10])
        errors: list[BaseException] = []

        def search() -> None:
            try:
                for _ in range(20):
                    view = api.view()
                    found = view.nearest(vectors[0], 20, settings)
                    assert all(image_id in view.catalog for image_id in found)
            except BaseException as error:
                errors.append(error)

        searchers = [threading.Thread(target=search) for _ in range(3)]
        for thread in searchers:
            thread.start()
        api.may_finish.set()
        for thread in searchers:
            thread.join()
        assert not errors
        assert wait_for(lambda: api.view().catalog is not old_catalog)
        swapped = api.view().catalog  # the rebuilt mirror, with the writes made meanwhile replayed
        assert ids[150] in swapped and ids[5] not in swapped and other_ids[0] in swapped
        assert swapped.metadata(ids[0]) == {"path": "renamed.jpg"}
        api.refresh_if_stale(wait=True)
        assert mirror_state(api) == chroma_state(api)
        assert len(api) == 200 - 5 + 50 and api.metadata(ids[0]) == {"path": "renamed.jpg"}
        assert api.metadata(ids[150]) == metadatas[150] and api.metadata(other_ids[3]) == other_metadatas[3]


def test_server_mode_write_after_another_process_wrote_leads_to_a_rebuild(server, tmp_path):
    settings = server_settings(server, tmp_path, "stale")
    ids, vectors, metadatas = records("a", 20, seed=7)
    with VectorStore(settings, MODEL, DIM) as first, VectorStore(settings, MODEL, DIM) as second:
        first.write(ids[:10], vectors[:10], metadatas[:10])
        second.write(ids[10:], vectors[10:], metadatas[10:])
        first.update_metadata(ids[12:13], [{"path": "seen-by-first.jpg"}])  # an id its mirror lacks
        assert ids[15] not in first and first.view().stamp != first.recorded()["stamp"]
        first.refresh_if_stale(wait=True)
        second.refresh_if_stale(wait=True)
        assert mirror_state(first) == chroma_state(first) == mirror_state(second)
        assert first.metadata(ids[12]) == {"path": "seen-by-first.jpg"}


# -- the mirror on disk ------------------------------------------------------------------------------


def mirror_builds(settings: Settings) -> list[str]:
    return sorted(build.name for build in store.mirror_folder(settings).glob("build-*"))


def refuse_to_read_chroma(monkeypatch: pytest.MonkeyPatch) -> None:
    def read_view(self: VectorStore, collection: Any) -> StoreView:
        raise AssertionError("the mirror was rebuilt from Chroma")

    monkeypatch.setattr(VectorStore, "_read_view", read_view)


def test_a_reopened_store_takes_its_mirror_from_disk_without_reading_chroma(embedded, monkeypatch):
    ids, vectors, metadatas = records("img", 300, seed=8)
    with open_store(embedded) as first:
        first.write(ids, vectors, metadatas)
        first.delete(ids[:10])
        with pytest.raises(ValueError):  # refused by Chroma: the mirror on disk stays current
            first.write(["bad"], vectors[:1], [{"path": {"nested": "no"}}])
        before = mirror_state(first)
    builds = mirror_builds(embedded)
    refuse_to_read_chroma(monkeypatch)
    with open_store(embedded) as reopened:
        assert mirror_state(reopened) == chroma_state(reopened) == before
        assert [hit.id for hit in reopened.keyword_search("t42")] == [ids[42]]
        assert reopened.field_names() == {"path", "group", "tags"}
        reopened.write(ids[:10], vectors[:10], metadatas[:10])
    with open_store(embedded) as again:
        assert len(again) == 300 and mirror_state(again) == chroma_state(again)
    assert mirror_builds(embedded) == builds and len(builds) == 1


def test_a_mirror_without_the_index_on_ids_gets_it_and_reads_the_same_rows(tmp_path):
    """Ids are read at each open from the index on ids (it holds the rows too), not from the table of
    metadata; a mirror of an earlier version, without that index, gets it at its next open."""
    dim, count = 8, 50
    vectors = np.eye(count, dim, dtype=np.float32) + 0.01
    ids = [f"img-{i}" for i in range(count)]
    catalog = Catalog(tmp_path / "mirror", dim)
    catalog.put(ids, vectors, [{"n": i} for i in range(count)])
    catalog.remove(ids[5:9])
    catalog.put(["late"], vectors[:1], [{"n": -1}])  # takes a freed row
    expected = {image_id: catalog.rows_of([image_id])[0] for image_id in [*ids[:5], *ids[9:], "late"]}
    catalog._db.execute("DROP INDEX images_by_id")
    catalog.close()
    reopened = Catalog(tmp_path / "mirror", dim)
    plan = reopened._db.execute("EXPLAIN QUERY PLAN SELECT row, id FROM images").fetchall()
    assert "COVERING INDEX images_by_id" in str(plan)
    assert {image_id: reopened.rows_of([image_id])[0] for image_id, _ in reopened.items()} == expected
    assert reopened.rows_of(ids[5:9]).tolist() == [ABSENT] * 4
    reopened.put(ids[5:9], vectors[5:9], [{"n": i} for i in range(5, 9)])  # the free rows, no growth
    assert len(reopened._ids) == len(catalog._ids)
    reopened.close()


def test_candidates_are_read_up_to_the_last_one_that_can_still_enter_the_top():
    """Candidates come best first by approximate score; those read so far bound the error of the
    approximate scores, and every unread one within ERROR_MARGIN times that error of the top's last
    exact score must be read too."""
    approximate = np.array([0.875, 0.8125, 0.75, 0.6875, 0.625, 0.5625, 0.5], dtype=np.float32)
    exact = np.array([0.90625, 0.78125, 0.75], dtype=np.float32)  # off by 1/32 at most
    assert _rows_to_read(exact, approximate, count=2) == 3  # 0.6875 < 0.78125 - 2/32: settled
    assert _rows_to_read(exact, approximate, count=3) == 6  # 0.6875 may be 0.75: twice those read
    assert _rows_to_read(exact[:1], approximate, count=1) == 1  # 0.8125 < 0.90625 - 2/32: settled
    off_by_an_eighth = np.array([0.75], dtype=np.float32)
    assert _rows_to_read(off_by_an_eighth, approximate, count=1) == 7  # all reach 0.75 - 2/8
    assert _rows_to_read(off_by_an_eighth, approximate[:-1], count=1) == 6  # no more than there are
    assert _rows_to_read(exact, approximate, count=4) == 6  # fewer read than asked: twice as many
    assert _rows_to_read(exact, np.full(7, np.inf, dtype=np.float32), count=2) == 6  # no error known
    unscored_first = np.array([np.inf, 0.8125, 0.75, 0.6875, 0.625, 0.5625, 0.5], dtype=np.float32)
    assert _rows_to_read(exact, unscored_first, count=2) == 3  # its error (inf) is not counted
    assert _rows_to_read(exact, approximate[:3], count=4) == 3  # every candidate read


def test_an_image_query_settles_in_the_first_stage_and_a_random_direction_reads_every_candidate(
    tmp_path, monkeypatch
):
    """Both still give the exact top; only how many candidates were read in float32 differs."""
    monkeypatch.setattr("product_codes.RERANK", 400)
    monkeypatch.setattr("catalog.FIRST_STAGE", 32)
    reads: list[tuple[int, int]] = []  # (candidates read, candidates to read) at each check

    def recorded_rows_to_read(exact: np.ndarray, approximate: np.ndarray, count: int) -> int:
        reads.append((len(exact), _rows_to_read(exact, approximate, count)))
        return reads[-1][1]

    monkeypatch.setattr("catalog._rows_to_read", recorded_rows_to_read)
    dim, rng = 64, np.random.default_rng(5)
    centres = rng.normal(size=(100, dim))
    vectors = (np.repeat(centres, 30, axis=0) + 0.1 * rng.normal(size=(3000, dim))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"img-{i}" for i in range(3000)]
    catalog = Catalog(tmp_path / "mirror", dim, first_pass_min=1000)
    catalog.put(ids, vectors, [{}] * 3000)
    catalog.set_stamp("written")  # the end of a write: codes are due
    assert catalog.wait_for_codes()
    direction = rng.normal(size=dim).astype(np.float32)
    for query, stops_early in [(vectors[45], True), (direction / np.linalg.norm(direction), False)]:
        reads.clear()
        found = catalog.exact_top(query, None, 10, exclude=frozenset({"img-45"}))
        truth = [i for i in np.argsort(-(vectors @ query), kind="stable") if i != 45][:10]
        assert [image_id for image_id, _ in found] == [ids[i] for i in truth]
        if stops_early:
            assert reads == [(42, 42)]  # settled at the first check: 42 of the 411 candidates read
        else:
            assert reads[-1] == (411, 411)  # every candidate: RERANK + 10 + the one excluded
            assert len(reads) < 5  # doubling from 42 checks at 42, 84, 168, 336 and 411
    catalog.close()


def resident_kb(path: Path) -> int:
    """Kilobytes of `path`'s pages in this process's page tables, over all its mappings."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if not line[:1].isupper():  # a mapping's header line: its addresses, then its file
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads Linux's /proc/self/smaps")
@pytest.mark.parametrize("memory_share", [0.5, 0.0])
def test_a_reopened_mirror_maps_the_pages_of_its_vectors_in_the_background_if_they_fit(
    tmp_path, monkeypatch, memory_share
):
    """Every page of the rows in use is in the page tables soon after opening, though no search read
    them, so the first searches' scattered reads take no page faults; unless the vectors would take
    more than MAPPING_MEMORY_SHARE of the machine's memory (here 0: any)."""
    monkeypatch.setattr("catalog.MAPPING_MEMORY_SHARE", memory_share)
    dim, count = 512, 4096  # 8 MB of float32, 2,048 pages
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    writer = Catalog(tmp_path / "mirror", dim)
    writer.put([f"img-{i}" for i in range(count)], vectors, [{}] * count)
    writer.set_stamp("written")
    writer.close()
    del writer
    gc.collect()  # its mapping, whose pages the writes touched, is gone
    vectors_file = tmp_path / "mirror" / "vectors.f32"
    assert resident_kb(vectors_file) == 0

    catalog = Catalog(tmp_path / "mirror", dim)
    whole_kb = count * dim * 4 // 1024
    deadline = time.monotonic() + (30 if memory_share else 1)  # long enough to see a page mapped
    while resident_kb(vectors_file) < whole_kb and time.monotonic() < deadline:
        time.sleep(0.05)
    found = resident_kb(vectors_file)
    assert (found >= whole_kb) if memory_share else (found == 0)
    assert np.array_equal(catalog.vector("img-7"), vectors[7])
    catalog.close()


def test_product_codes_are_trained_once_kept_in_step_by_writes_and_reused_after_a_reopen(embedded):
    """A library of FIRST_PASS_MIN images gets its codes in the background; they follow each write,
    are saved with the stamp at close and read back at the next start instead of trained again."""
    settings = embedded.with_overrides(FIRST_PASS_MIN=400)
    ids, vectors, metadatas = records("img", 600, seed=21)
    with open_store(settings) as first:
        first.write(ids[:300], vectors[:300], metadatas[:300])
        assert first.first_pass() == "scan"  # below FIRST_PASS_MIN
        first.write(ids[300:], vectors[300:], metadatas[300:])
        assert first.first_pass() in ("codes building", "codes")
        assert first.view().catalog.wait_for_codes() and first.first_pass() == "codes"
    codes = store.mirror_folder(settings) / mirror_builds(settings)[0] / "codes.npz"
    trained = codes.stat().st_mtime_ns
    with open_store(settings) as reopened:
        assert reopened.first_pass() == "codes"  # read back, not building
        moved = np.roll(vectors[:50], 1, axis=1)
        reopened.write(ids[:50], moved, metadatas[:50])
        catalog = reopened.view().catalog
        for image_id, vector in zip(ids[:50], moved, strict=True):
            assert catalog.exact_top(vector, None, 1)[0][0] == image_id
    assert codes.stat().st_mtime_ns > trained  # saved again at close, with the new stamp
    with open_store(settings) as again:
        assert again.first_pass() == "codes"
        assert again.view().catalog.exact_top(moved[7], None, 1)[0][0] == ids[7]


def test_a_write_cut_short_by_a_crash_makes_the_next_start_rebuild_the_mirror(embedded):
    ids, vectors, metadatas = records("img", 50, seed=9)
    with open_store(embedded) as crashed:
        crashed.write(ids, vectors, metadatas)
        builds = mirror_builds(embedded)
        view = crashed.view()
        view.catalog.set_stamp("")  # what a write does first; then Chroma took it and the process died
        view.collection.upsert(ids=["taken"], embeddings=vectors[:1], metadatas=[{"path": "taken.jpg"}])
    with open_store(embedded) as reopened:
        assert "taken" in reopened and mirror_state(reopened) == chroma_state(reopened)
    assert mirror_builds(embedded) != builds and len(mirror_builds(embedded)) == 1


@pytest.mark.parametrize("damage", ["database", "vectors"])
def test_a_damaged_mirror_is_rebuilt_from_chroma(embedded, damage):
    ids, vectors, metadatas = records("img", 40, seed=10)
    with open_store(embedded) as first:
        first.write(ids, vectors, metadatas)
        folder = first.view().catalog.folder
    if damage == "database":
        (folder / "mirror.sqlite").write_bytes(b"not a database" * 100)
    else:
        with open(folder / "vectors.f32", "r+b") as vectors_file:
            vectors_file.truncate(12345)
    with open_store(embedded) as reopened:
        assert len(reopened) == 40 and mirror_state(reopened) == chroma_state(reopened)


def test_a_second_process_on_the_same_mirror_folder_keeps_a_private_one(server, tmp_path):
    settings = server_settings(server, tmp_path, "shared-folder")
    ids, vectors, metadatas = records("s", 30, seed=11)
    with VectorStore(settings, MODEL, DIM) as first, VectorStore(settings, MODEL, DIM) as second:
        first.write(ids, vectors, metadatas)
        second.refresh_if_stale(wait=True)
        private = second.view().catalog.folder
        assert first.view().catalog.folder.parent == store.mirror_folder(settings)
        assert store.mirror_folder(settings) not in private.parents
        assert mirror_state(first) == chroma_state(first) == mirror_state(second)
    assert not private.exists()
    with VectorStore(settings, MODEL, DIM) as reopened:
        assert reopened.view().catalog.folder.parent == store.mirror_folder(settings)
        assert mirror_state(reopened) == chroma_state(reopened)


def test_a_mirror_write_that_fails_after_chroma_took_it_is_a_store_error_and_repaired_at_start(
    embedded, monkeypatch
):
    ids, vectors, metadatas = records("img", 20, seed=12)
    with open_store(embedded) as first:
        first.write(ids[:10], vectors[:10], metadatas[:10])
        with monkeypatch.context() as patch:
            patch.setattr(Catalog, "put", lambda *args: (_ for _ in ()).throw(OSError(28, "disk full")))
            with pytest.raises(StoreError, match="disk full"):  # new vectors for the same images
                first.write(ids[:10], vectors[10:], metadatas[10:])
        first.update_metadata(ids[:1], [{"path": "later.jpg"}])  # still marked: rebuilt at next start
    with open_store(embedded) as reopened:
        assert len(reopened) == 10 and mirror_state(reopened) == chroma_state(reopened)
        assert reopened.metadata(ids[0]) == {"path": "later.jpg"}
        assert np.allclose(reopened.vector(ids[1]), vectors[11], atol=1e-6)


def selected_ids(store_: VectorStore, mask: np.ndarray) -> set[str]:
    ids = [image_id for image_id, _ in store_.items()]
    return {
        image_id
        for image_id, keep in zip(ids, store_.view().catalog.selected(ids, mask), strict=True)
        if keep
    }


def matching_ids(store_: VectorStore, group: int) -> set[str]:
    return {image_id for image_id, metadata in store_.items() if metadata.get("group") == group}


def test_a_cached_filter_mask_follows_every_write_even_one_made_while_it_is_computed(embedded, monkeypatch):
    ids, vectors, metadatas = records("img", 100, seed=13)
    group_one = parse_filter("group = 1")
    with open_store(embedded) as opened:
        opened.write(ids[:60], vectors[:60], metadatas[:60])

        def write_after_reading(*arguments: Any) -> FieldColumn:
            column = read_column(*arguments)
            opened.write(["midway"], vectors[:1], [{"path": "m.jpg", "group": 1}])
            opened.update_metadata(ids[:2], [{"path": "u.jpg", "group": 1}] * 2)
            opened.delete(ids[3:5])
            return column

        with monkeypatch.context() as patch:
            patch.setattr("catalog.read_column", write_after_reading)
            mask = opened.mask(group_one)
        assert "midway" in matching_ids(opened, 1)
        assert selected_ids(opened, mask) == matching_ids(opened, 1)
        opened.write(ids[60:], vectors[60:], metadatas[60:])  # the mirror grows past the cached mask
        opened.update_metadata(ids[5:8], [{"path": "v.jpg", "group": 1}] * 3)
        opened.delete(ids[9:30])
        assert selected_ids(opened, opened.mask(group_one)) == matching_ids(opened, 1)
        one_again = parse_filter("group in 1|5")  # another filter, on the column read and kept up to date
        assert selected_ids(opened, opened.mask(one_again)) == matching_ids(opened, 1)


def race_for_one_field(store_: VectorStore, ids: list[str], reading: threading.Event) -> dict[str, Any]:
    """A search that starts reading the field `group`, and two more that need it while it is read (a
    filter, the numbers of a date sort): each one's outcome, or its error."""
    outcomes: dict[str, Any] = {}

    def search(label: str, action: Any) -> None:
        try:
            outcomes[label] = action()
        except RuntimeError as error:
            outcomes[label] = error

    def by_mask(group: int) -> set[str]:
        return selected_ids(store_, store_.mask(parse_filter(f"group = {group}")))

    def by_numbers() -> list[float]:
        catalog = store_.view().catalog
        return catalog.numbers(catalog.rows_of(ids), "group").tolist()

    reading.clear()
    first = threading.Thread(target=search, args=("1", lambda: by_mask(1)))
    first.start()
    assert reading.wait(10)
    others = [
        threading.Thread(target=search, args=("2", lambda: by_mask(2))),
        threading.Thread(target=search, args=("numbers", by_numbers)),
    ]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(30)
    return outcomes


def test_searches_needing_a_field_being_read_wait_for_that_read_instead_of_reading_it_again(
    embedded, monkeypatch
):
    ids, vectors, metadatas = records("img", 60, seed=31)
    with open_store(embedded) as opened:
        opened.write(ids, vectors, metadatas)
    groups = {
        group: {i for i, m in zip(ids, metadatas, strict=True) if m["group"] == group} for group in (1, 2)
    }
    numbers = [float(metadata["group"]) for metadata in metadatas]
    reading, reads = threading.Event(), []
    failures = [RuntimeError("the disk went away")]  # the first read fails, the next ones work

    def slow_read(*arguments: Any) -> FieldColumn:
        reads.append(arguments[1])
        reading.set()
        time.sleep(0.4)
        if failures:
            raise failures.pop()
        return read_column(*arguments)

    monkeypatch.setattr("catalog.read_column", slow_read)
    with open_store(embedded) as opened:
        failed = race_for_one_field(opened, ids, reading)
        assert reads == ["group", "group"]  # the read that failed, then one by a search that waited
        assert isinstance(failed["1"], RuntimeError)
        assert (failed["2"], failed["numbers"]) == (groups[2], numbers)
    with open_store(embedded) as opened:  # a fresh mirror: no column read yet
        shared = race_for_one_field(opened, ids, reading)
        assert reads == ["group", "group", "group"]
        assert shared == {"1": groups[1], "2": groups[2], "numbers": numbers}


def test_the_fields_read_last_are_read_again_by_the_next_catalog_and_none_other(tmp_path, monkeypatch):
    ids, vectors, metadatas = records("img", 30, seed=37)
    catalog = Catalog(tmp_path / "mirror", DIM)
    catalog.put(ids, vectors, [{**metadata, "taken": float(i)} for i, metadata in enumerate(metadatas)])
    catalog.mask(parse_filter("group = 1"))
    catalog.numbers(catalog.rows_of(ids), "taken")
    extra = [f"field{i}" for i in range(RECENT_FIELDS - 1)]
    for name in extra:
        catalog.read_field(name)
    catalog.close()

    reopened = Catalog(tmp_path / "mirror", DIM)
    assert reopened.read_recent_fields() == ["taken", *extra]  # the oldest, group, no longer
    reads: list[str] = []
    monkeypatch.setattr(
        "catalog.read_column", lambda *arguments: reads.append(arguments[1]) or read_column(*arguments)
    )
    assert reopened.numbers(reopened.rows_of(ids[:3]), "taken").tolist() == [0.0, 1.0, 2.0]
    assert reads == []
    mask = reopened.mask(parse_filter("group = 1"))
    assert reads == ["group"] and int(mask.sum()) == sum(metadata["group"] == 1 for metadata in metadatas)
    reopened.close()
    third = Catalog(tmp_path / "mirror", DIM)
    assert third.read_recent_fields() == [*extra, "group"]  # the order survives a warm-up
    third.close()


def refuse_to_read(*arguments: Any) -> None:
    raise AssertionError("a field already read was read again")


def test_a_new_filter_on_a_field_read_before_reads_no_records_and_sees_every_write(embedded, monkeypatch):
    ids, vectors, metadatas = records("img", 90, seed=17)
    with open_store(embedded) as opened:
        opened.write(ids[:50], vectors[:50], metadatas[:50])
        assert selected_ids(opened, opened.mask(parse_filter("group = 1"))) == matching_ids(opened, 1)
        monkeypatch.setattr("catalog.read_column", refuse_to_read)
        opened.write(ids[50:], vectors[50:], metadatas[50:])
        opened.update_metadata(ids[:4], [{"path": "u.jpg", "group": 2}] * 4)
        opened.delete(ids[10:20])
        for group in (0, 2):
            mask = opened.mask(parse_filter(f"group = {group}"))
            assert selected_ids(opened, mask) == matching_ids(opened, group)
        with pytest.raises(AssertionError, match="read again"):
            opened.mask(parse_filter("path prefix img-1"))


def test_a_field_no_image_has_is_not_read_and_then_follows_the_writes(embedded, monkeypatch):
    ids, vectors, metadatas = records("img", 30, seed=29)
    with open_store(embedded) as opened:
        opened.write(ids, vectors, metadatas)
        monkeypatch.setattr("catalog.read_column", refuse_to_read)
        catalog = opened.view().catalog
        assert np.isnan(catalog.numbers(catalog.rows_of(ids), "taken")).all()
        assert selected_ids(opened, opened.mask(parse_filter("album = trip"))) == set()
        opened.write(["dated"], vectors[:1], [{"path": "d.jpg", "taken": 12.5, "album": "trip"}])
        opened.update_metadata(ids[:1], [{"path": "u.jpg", "taken": 3.0}])
        catalog = opened.view().catalog
        assert catalog.numbers(catalog.rows_of([ids[0], "dated", ids[1]]), "taken")[:2].tolist() == [
            3.0,
            12.5,
        ]
        assert selected_ids(opened, opened.mask(parse_filter("album = trip"))) == {"dated"}


def fail_if_scanned(*arguments: Any) -> None:
    raise AssertionError("the float16 scan ran where the product codes should have chosen")


def exact_truth(
    vectors: dict[str, np.ndarray], query: np.ndarray, allowed: set[str], count: int
) -> list[str]:
    ids = sorted(allowed)
    scores = np.array([vectors[image_id] @ query for image_id in ids])
    return [ids[i] for i in np.argsort(-scores, kind="stable")[:count]]


FIRST_PASSES = {
    "gathered-rows": {"share": 1.0, "codes_from": 0},
    "float16-scan": {"share": 0.0, "codes_from": 0},
    "product-codes": {"share": 0.0, "codes_from": 2000},
}


@pytest.mark.parametrize("first_pass", FIRST_PASSES.values(), ids=FIRST_PASSES.keys())
def test_exact_top_equals_float32_cosine_through_writes_deletes_and_a_lost_scan_copy(
    tmp_path, monkeypatch, first_pass
):
    """Each way of ranking exactly (reading the selected float32 rows; or narrowing the candidates
    down by a scan of the float16 copy, or by the product codes re-encoded in place and extended by
    every write, then ranking them in float32) gives the float32 exact top; an earlier version's
    bfloat16 copy is removed; codes saved with the mirror's stamp are used again after a reopen."""
    monkeypatch.setattr("catalog.GATHER_MAX_SHARE", first_pass["share"])
    monkeypatch.setattr("product_codes.RERANK", 300)  # of ~2,800 rows: the codes must choose
    monkeypatch.setattr("product_codes.SHARD_ROWS", 1024)  # 3,100 rows: four shards, searched side by side
    monkeypatch.setattr("catalog.FIRST_STAGE", 16)  # candidates read from 41 on, in stages
    monkeypatch.setattr("catalog.GATHER_BYTES", 20 * 64 * 4)  # 20 rows a block: shares read side by side
    codes_from = first_pass["codes_from"]
    if codes_from:
        monkeypatch.setattr("scan_copy.best_rows", fail_if_scanned)
    dim, rng = 64, np.random.default_rng(14)

    def unit(count: int) -> np.ndarray:
        found = rng.normal(size=(count, dim)).astype(np.float32)
        return found / np.linalg.norm(found, axis=1, keepdims=True)

    ids = [f"img-{i}" for i in range(3000)]
    kept = dict(zip(ids, unit(3000), strict=True))
    catalog = Catalog(tmp_path / "mirror", dim, codes_from)
    catalog.put(ids, np.stack(list(kept.values())), [{"group": i % 2} for i in range(3000)])
    catalog.set_stamp("before")
    assert catalog.wait_for_codes() == bool(codes_from)
    catalog.remove(ids[:500])
    added = {f"new-{i}": vector for i, vector in enumerate(unit(600))}  # 500 rows freed, 100 past the end
    changed = dict(zip(ids[500:600], unit(100), strict=True))
    for batch in (added, changed):
        catalog.put(list(batch), np.stack(list(batch.values())), [{"group": 0}] * len(batch))
    catalog.set_stamp("after")
    kept = {**{i: v for i, v in kept.items() if i not in ids[:500]}, **added, **changed}
    group_one = parse_filter("group = 1")
    queries = [*unit(8), kept["img-700"], kept["new-3"], kept["new-599"], kept["img-550"]]

    def check(opened: Catalog) -> None:
        ones = {image_id for image_id, metadata in opened.items() if metadata["group"] == 1}
        for query in queries:
            for mask, allowed in [(None, set(kept)), (opened.mask(group_one), ones)]:
                found = opened.exact_top(query, mask, 25, exclude=frozenset({"img-700"}))
                assert [image_id for image_id, _ in found] == exact_truth(
                    kept, query, allowed - {"img-700"}, 25
                )
                assert np.allclose(
                    [score for _, score in found], [kept[i] @ query for i, _ in found], atol=1e-6
                )

    check(catalog)
    catalog.close()
    (tmp_path / "mirror" / "vectors.f16").unlink()
    (tmp_path / "mirror" / "vectors.bf16").write_bytes(b"\0" * 1024)
    reopened = Catalog(tmp_path / "mirror", dim, codes_from)
    assert not (tmp_path / "mirror" / "vectors.bf16").exists()
    assert reopened.wait_for_codes() == bool(codes_from)
    check(reopened)
    reopened.close()


def test_a_fields_numbers_are_read_once_and_follow_every_write(embedded, monkeypatch):
    ids, vectors, metadatas = records("img", 40, seed=19)
    dated = [
        {**metadata, "taken": 1000.0 + i if i % 4 else "unknown"} for i, metadata in enumerate(metadatas)
    ]
    with open_store(embedded) as opened:
        opened.write(ids, vectors, dated)

        def expected() -> list[float]:
            taken = {image_id: metadata.get("taken") for image_id, metadata in opened.items()}
            return [taken[i] if isinstance(taken.get(i), float) else np.nan for i in [*ids, "missing"]]

        def numbers(of: list[str]) -> np.ndarray:
            catalog = opened.view().catalog
            return catalog.numbers(catalog.rows_of(of), "taken")

        np.testing.assert_array_equal(numbers([*ids, "missing"]), expected())
        monkeypatch.setattr("catalog.read_column", refuse_to_read)
        opened.update_metadata(ids[:3], [{"path": "u.jpg", "taken": 5.0}, {"path": "v.jpg"}, {"taken": True}])
        opened.delete(ids[5:7])
        opened.write(["new"], vectors[:1], [{"path": "n.jpg", "taken": 7.5}])
        np.testing.assert_array_equal(numbers([*ids, "missing"]), expected())
        assert numbers(["new"]).tolist() == [7.5]


def test_ranked_rows_and_twins_agree_with_numpy_over_any_rows(tmp_path, monkeypatch):
    dim, count = 16, 3000
    monkeypatch.setattr("catalog.GATHER_BYTES", 128 * 16 * 4)  # 128 rows a block, in shares side by side
    rng = np.random.default_rng(23)
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[100] = vectors[7]  # a twin of the page's first vector, elsewhere in row order
    vectors[15] = vectors[30]  # another, removed below: its row is free
    catalog = Catalog(tmp_path / "mirror", dim)
    ids = [f"img-{i}" for i in range(count)]
    catalog.put(ids, vectors, [{"n": i} for i in range(count)])
    rows_of = catalog.rows_of(ids)
    catalog.remove(ids[10:20])
    query = rng.normal(size=dim).astype(np.float32)

    ids_by_row, rows, scores = catalog.ranked_rows(query, None, frozenset(ids[:2]))
    left = [i for i in range(2, count) if not 10 <= i < 20]
    expected = sorted(left, key=lambda i: (-float(vectors[i] @ query), rows_of[i]))
    assert [ids_by_row[row] for row in rows] == [ids[i] for i in expected]
    np.testing.assert_allclose(scores, vectors[expected] @ query, atol=1e-5)

    order = np.concatenate([np.arange(300, 0, -1), [-1], rng.permutation(np.arange(301, count))])
    scrambled = np.where(order < 0, ABSENT, rows_of[np.maximum(order, 0)])
    page = vectors[[7, 30]]
    found, first = catalog.twins(scrambled, page, 0.97)
    near = vectors[np.maximum(order, 0)] @ page.T >= 0.97
    near[(order < 0) | ((order >= 10) & (order < 20))] = False  # ABSENT, and the rows freed
    assert found.tolist() == np.flatnonzero(near.any(axis=1)).tolist()
    assert first.tolist() == near[found].argmax(axis=1).tolist()
    assert {int(order[i]) for i in found} == {7, 100, 30}

    out_of_order = np.array([3, 5, 4, 6, 9, 8])  # consecutive rows, not in order: gathered, not viewed
    by_row = {int(row): i for i, row in enumerate(rows_of)}
    np.testing.assert_allclose(
        catalog._exact_scores(out_of_order, query),
        vectors[[by_row[row] for row in out_of_order]] @ query,
        atol=1e-5,
    )
    catalog.close()
