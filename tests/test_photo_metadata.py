"""Issue 14: when, where and with what a photo was taken (EXIF, offline place names), HEIC and AVIF."""

from __future__ import annotations

import logging
import random
import shutil
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from data_factory import COLOURS, drawn_scene
from PIL import ExifTags, Image, ImageDraw
from PIL.TiffImagePlugin import IFDRational

import indexer
from api_requests import BadRequest, search_request_from_json
from config import Settings
from errors import QueryError
from image_io import decode_for_model, find_images
from image_retrieval import ImageRetrieval, SearchQuery
from main import format_table
from photo_metadata import PHOTO_FIELDS, camera_name, parse_offset, photo_fields, read_photo_fields
from store import mirror_folder

LISBON = (38.7223, -9.1393)
TOKYO = (35.6762, 139.6503)
SYDNEY = (-33.8688, 151.2093)
NEW_YORK = (40.7128, -74.0060)


def dms(degrees: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    whole = int(degrees)
    minutes = int((degrees - whole) * 60)
    seconds = Fraction((degrees - whole - minutes / 60) * 3600).limit_denominator(1000)
    return IFDRational(whole, 1), IFDRational(minutes, 1), IFDRational(seconds.numerator, seconds.denominator)


def exif_block(
    *,
    taken: str | None = None,
    offset: str | None = None,
    make: str | None = None,
    model: str | None = None,
    position: tuple[float, float] | None = None,
    orientation: int | None = None,
    lens: str | None = None,
    iso: int | None = None,
    exposure: tuple[int, int] | None = None,
    focal_length: float | None = None,
) -> Image.Exif:
    exif = Image.Exif()
    for tag, value in ((ExifTags.Base.Make, make), (ExifTags.Base.Model, model)):
        if value is not None:
            exif[tag] = value
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    details = exif.get_ifd(ExifTags.IFD.Exif)
    for tag, value in (
        (ExifTags.Base.DateTimeOriginal, taken),
        (ExifTags.Base.OffsetTimeOriginal, offset),
        (ExifTags.Base.LensModel, lens),
        (ExifTags.Base.ISOSpeedRatings, iso),
        (ExifTags.Base.ExposureTime, exposure and IFDRational(*exposure)),
        (ExifTags.Base.FocalLength, focal_length and IFDRational(int(focal_length * 10), 10)),
    ):
        if value is not None:
            details[tag] = value
    if position is not None:
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        latitude, longitude = position
        gps[ExifTags.GPS.GPSLatitudeRef] = "N" if latitude >= 0 else "S"
        gps[ExifTags.GPS.GPSLatitude] = dms(abs(latitude))
        gps[ExifTags.GPS.GPSLongitudeRef] = "E" if longitude >= 0 else "W"
        gps[ExifTags.GPS.GPSLongitude] = dms(abs(longitude))
    return exif


def scene(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """Left half red, right half blue, and a seed-dependent spot, so orientation and identity show."""
    image = Image.new("RGB", size, (220, 20, 20))
    draw = ImageDraw.Draw(image)
    draw.rectangle([size[0] // 2, 0, size[0], size[1]], fill=(20, 20, 220))
    draw.ellipse([seed % 40, seed % 30, seed % 40 + 12, seed % 30 + 12], fill=(seed * 37 % 256, 200, 60))
    return image


def distinct_scene(seed: int) -> Image.Image:
    """A busy random scene: different seeds are far from near-duplicates even for the tiny model."""
    rng = random.Random(seed)
    image = drawn_scene(rng, (160, 120), rng.choice(COLOURS))
    noise = np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    return Image.blend(image, Image.fromarray(noise), 0.5)


def write_photo(
    path: Path, seed: int, image_format: str = "JPEG", upright_scene: bool = False, **exif: object
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = scene(seed) if upright_scene else distinct_scene(seed)
    picture.save(path, image_format, exif=exif_block(**exif).tobytes(), quality=90)
    return path


def fields_of(path: Path) -> dict:
    return read_photo_fields(path)


# -- reading EXIF -----------------------------------------------------------------------------------


def test_date_taken_with_and_without_offset(tmp_path):
    with_offset = fields_of(write_photo(tmp_path / "a.jpg", 1, taken="2019:06:15 14:30:05", offset="+01:00"))
    assert datetime.fromtimestamp(with_offset["taken"], UTC) == datetime(2019, 6, 15, 14, 30, 5, tzinfo=UTC)
    assert with_offset["taken_offset"] == "+01:00"
    naive = fields_of(write_photo(tmp_path / "b.jpg", 2, taken="2021:12:31 23:59:59"))
    assert datetime.fromtimestamp(naive["taken"], UTC) == datetime(2021, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert "taken_offset" not in naive
    for blank in ("0000:00:00 00:00:00", "    :  :     :  :  ", "2019:13:45 10:00:00"):
        assert "taken" not in fields_of(write_photo(tmp_path / "c.jpg", 3, taken=blank)), blank
    assert parse_offset("-0530") == "-05:30" and parse_offset("+25:00") is None


def test_no_exif_never_falls_back_to_the_file_time(tmp_path):
    path = tmp_path / "plain.jpg"
    scene(4).save(path)
    assert fields_of(path) == {}


@pytest.mark.parametrize(
    ("make", "model", "expected"),
    [
        ("Apple", "iPhone 12", "Apple iPhone 12"),
        ("Canon", "Canon EOS 5D Mark IV", "Canon EOS 5D Mark IV"),
        ("NIKON CORPORATION", "NIKON D750", "Nikon D750"),
        ("  OLYMPUS IMAGING CORP.  ", "E-M10  Mark II\x00\x00", "Olympus E-M10 Mark II"),
        ("SONY", "ILCE-7M3", "Sony ILCE-7M3"),
        (None, "Pixel 7", "Pixel 7"),
        ("", "", None),
    ],
)
def test_camera_name_is_tidied(make, model, expected):
    assert camera_name(make, model) == expected


def test_camera_lens_and_exposure(tmp_path):
    fields = fields_of(
        write_photo(
            tmp_path / "a.jpg",
            5,
            make="Apple",
            model="iPhone 12",
            lens="iPhone 12 back dual wide camera 4.2mm f/1.6",
            iso=125,
            exposure=(1, 250),
            focal_length=4.2,
        )
    )
    assert fields["camera"] == "Apple iPhone 12"
    assert fields["lens"] == "iPhone 12 back dual wide camera 4.2mm f/1.6"
    assert fields["iso"] == 125
    assert fields["exposure"] == pytest.approx(0.004)
    assert fields["focal_length"] == pytest.approx(4.2)


@pytest.mark.parametrize(
    ("position", "place", "country", "code"),
    [
        (LISBON, "Lisbon", "Portugal", "PT"),
        (TOKYO, "Tokyo", "Japan", "JP"),
        (SYDNEY, "Sydney", "Australia", "AU"),
        (NEW_YORK, "New York City", "United States", "US"),
    ],
)
def test_gps_position_and_place_in_several_countries(tmp_path, position, place, country, code):
    fields = fields_of(write_photo(tmp_path / "a.jpg", 6, position=position))
    assert fields["latitude"] == pytest.approx(position[0], abs=1e-4)
    assert fields["longitude"] == pytest.approx(position[1], abs=1e-4)
    assert (fields["place"], fields["country"], fields["country_code"]) == (place, country, code)
    assert fields["region"]


def test_gps_zero_out_of_range_and_open_sea(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="photo_metadata")
    assert "latitude" not in fields_of(write_photo(tmp_path / "zero.jpg", 7, position=(0.0, 0.0)))
    assert "0,0" in caplog.text
    exif = exif_block(position=LISBON)
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] = (
        IFDRational(95, 1),
        IFDRational(0, 1),
        IFDRational(0, 1),
    )
    assert photo_fields(exif) == {}
    assert "out of range" in caplog.text
    at_sea = fields_of(write_photo(tmp_path / "sea.jpg", 8, position=(37.0, -30.0)))
    assert at_sea["latitude"] == pytest.approx(37.0) and "place" not in at_sea and "country" not in at_sea


def test_broken_exif_block_loses_only_its_fields(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "broken.jpg"
    scene(9).save(path, exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff garbage")
    assert fields_of(path) == {}
    exif = exif_block(taken="2019:06:15 14:30:05", make="Apple", model="iPhone 12")
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] = "not a number"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.ExposureTime] = IFDRational(1, 0)
    fields = photo_fields(exif)
    assert fields["camera"] == "Apple iPhone 12" and "taken" in fields
    assert "latitude" not in fields and "exposure" not in fields


# -- HEIC and AVIF ----------------------------------------------------------------------------------


def test_heic_and_avif_are_found_and_decoded_upright(tmp_path):
    heic = write_photo(
        tmp_path / "IMG_0001.HEIC", 10, "HEIF", True, orientation=6, make="Apple", model="iPhone 12"
    )
    avif = write_photo(tmp_path / "photo.avif", 11, "AVIF", True, orientation=6, taken="2020:01:02 03:04:05")
    assert sorted(path.name for path in find_images(tmp_path)) == ["IMG_0001.HEIC", "photo.avif"]
    for path, image_format in ((heic, "HEIF"), (avif, "AVIF")):
        image, facts = decode_for_model(path, 32, 100)
        assert (facts.format, facts.width, facts.height) == (image_format, 64, 96)
        pixels = np.asarray(image, dtype=np.float64)
        # orientation 6: the red left half of the scene is now on top
        assert pixels[:20, :, 0].mean() > 150 and pixels[-20:, :, 2].mean() > 150, path
    assert fields_of(heic)["camera"] == "Apple iPhone 12"
    assert datetime.fromtimestamp(fields_of(avif)["taken"], UTC).year == 2020


# -- indexing, filters, keyword search and sort -----------------------------------------------------


@pytest.fixture
def photo_library(tmp_path: Path) -> Path:
    library = tmp_path / "library"
    write_photo(library / "trip/a.jpg", 20, taken="2019:07:01 10:00:00", offset="+01:00", position=LISBON,
                make="Apple", model="iPhone 12")  # fmt: skip
    write_photo(library / "trip/b.jpg", 21, taken="2018:03:10 09:00:00", position=TOKYO,
                make="SONY", model="ILCE-7M3")  # fmt: skip
    write_photo(library / "trip/c.jpg", 22, taken="2020:12:24 20:00:00", position=(41.1579, -8.6291),
                make="Canon", model="Canon EOS R5")  # fmt: skip
    write_photo(library / "trip/d.heic", 23, "HEIF", taken="2019:05:30 12:00:00", position=LISBON,
                make="Apple", model="iPhone 13")  # fmt: skip
    write_photo(library / "trip/e.avif", 24, "AVIF", taken="2021:08:08 08:08:08", position=SYDNEY)
    write_photo(library / "misc/undated.jpg", 25)
    write_photo(library / "misc/zero.jpg", 26, position=(0.0, 0.0), make="Apple", model="iPhone 12")
    broken = library / "misc/broken.jpg"
    scene(27).save(broken, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff\x00")
    return library


def by_name(engine: ImageRetrieval) -> dict[str, dict]:
    return {metadata["name"]: metadata for _, metadata in engine.store.items()}


def names(result) -> list[str]:
    return [hit.metadata["name"] for hit in result.hits]


def test_indexing_stores_the_photo_fields(photo_library, settings_for):
    with ImageRetrieval(settings_for(photo_library)) as engine:
        summary = engine.index_folder()
        assert (summary.added, summary.failed) == (8, 0)
        photos = by_name(engine)
        assert photos["a.jpg"]["place"] == "Lisbon" and photos["a.jpg"]["taken_offset"] == "+01:00"
        assert photos["d.heic"]["format"] == "HEIF" and photos["d.heic"]["camera"] == "Apple iPhone 13"
        assert photos["e.avif"]["format"] == "AVIF" and photos["e.avif"]["country"] == "Australia"
        for name in ("undated.jpg", "zero.jpg", "broken.jpg"):
            assert not {"taken", "latitude", "place"} & set(photos[name]), name
        assert photos["zero.jpg"]["camera"] == "Apple iPhone 12"
    with ImageRetrieval(settings_for(photo_library)) as reopened:  # as Chroma stored them
        stored = by_name(reopened)["a.jpg"]
        assert {key: stored.get(key) for key in PHOTO_FIELDS} == {
            key: photos["a.jpg"].get(key) for key in PHOTO_FIELDS
        }


def test_filters_on_date_place_and_camera(photo_library, settings_for):
    with ImageRetrieval(settings_for(photo_library)) as engine:
        engine.index_folder()

        def found(filters: str | dict) -> set[str]:
            return set(names(engine.search_text("a photo", filters=filters, top_k=50)))

        assert found("taken >= 2019-06-01 and country = Portugal") == {"a.jpg", "c.jpg"}
        assert found({"taken": {"$lt": "2019-06-01"}}) == {"b.jpg", "d.heic"}
        assert found("camera contains iphone") == {"a.jpg", "d.heic", "zero.jpg"}
        assert found("country_code in JP|AU") == {"b.jpg", "e.avif"}


def test_place_and_camera_words_in_keyword_and_hybrid_search(photo_library, settings_for):
    with ImageRetrieval(settings_for(photo_library)) as engine:
        engine.index_folder()
        assert set(names(engine.search_text("lisbon", mode="keyword"))) == {"a.jpg", "d.heic"}
        hybrid = engine.search_text("lisbon", mode="hybrid", top_k=2)
        assert set(names(hybrid)) == {"a.jpg", "d.heic"}
        assert set(names(engine.search_text("australia", mode="keyword"))) == {"e.avif"}
        assert set(names(engine.search_text("camera:sony", mode="keyword"))) == {"b.jpg"}


def test_sort_by_date_taken(photo_library, settings_for):
    with ImageRetrieval(settings_for(photo_library)) as engine:
        engine.index_folder()
        oldest_first = engine.search(_query("taken"))
        dated = ["b.jpg", "d.heic", "a.jpg", "c.jpg", "e.avif"]
        assert names(oldest_first)[:5] == dated
        assert set(names(oldest_first)[5:]) == {"undated.jpg", "zero.jpg", "broken.jpg"}
        newest_first = engine.search(_query("-taken"))
        assert names(newest_first)[:5] == dated[::-1]
        assert [hit.rank for hit in newest_first.hits] == list(range(1, 9))
        lisbon = engine.search(_query("-taken", mode="keyword", text="lisbon"))
        assert names(lisbon) == ["a.jpg", "d.heic"]
        portugal = engine.search(_query("taken", filters="country = Portugal"))
        assert names(portugal) == ["d.heic", "a.jpg", "c.jpg"]
        first = engine.search(_query("taken", top_k=3))
        second = engine.search(_query("taken", top_k=3, offset=3))
        assert names(first) + names(second) == names(oldest_first)[:6] and first.has_more
        with pytest.raises(QueryError, match="sort must be one of"):
            engine.search(_query("date"))


def _query(sort: str, text: str = "a photo", **options) -> SearchQuery:
    from image_retrieval import QueryPart

    return SearchQuery([QueryPart(text=text)], **{"top_k": 50, "sort": sort, **options})


def test_sort_in_api_requests():
    assert search_request_from_json({"query": "x", "sort": "-taken"}).query.sort == "-taken"
    assert search_request_from_json({"query": "x"}).query.sort == "relevance"
    with pytest.raises(BadRequest, match="sort must be one of: relevance, taken, -taken"):
        search_request_from_json({"query": "x", "sort": "newest"})


def test_repl_table_shows_taken_and_place_columns(photo_library, settings_for):
    with ImageRetrieval(settings_for(photo_library)) as engine:
        engine.index_folder()
        table = format_table(engine.search(_query("taken", filters="folder = trip")).hits)
    lines = table.splitlines()
    assert lines[0].split() == ["rank", "score", "taken", "place", "path"]
    assert "2018-03-10 09:00" in lines[1] and "Tokyo, Japan" in lines[1] and lines[1].endswith("trip/b.jpg")


def without_mirror(settings: Settings) -> None:
    shutil.rmtree(mirror_folder(settings))


def test_an_old_index_gets_the_photo_fields_without_re_encoding(photo_library, settings_for, monkeypatch):
    settings = settings_for(photo_library)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        ids = [image_id for image_id, _ in engine.store.items()]
        stale = {key: None for key in ("photo_metadata", *indexer.PHOTO_FIELDS)}
        engine.store.view().collection.update(ids=ids, metadatas=[stale] * len(ids))
    without_mirror(settings)  # as an index of before issue 14, which had no mirror on disk either
    with ImageRetrieval(settings) as old:
        records = [metadata for _, metadata in old.store.items()]
        assert not any("taken" in record or "photo_metadata" in record for record in records)
        vectors = old.store.vectors(ids)

        def no_encoding(*args, **kwargs):
            raise AssertionError("an image was encoded")

        monkeypatch.setattr(old.encoder, "encode_pixels", no_encoding)
        summary = old.index_folder()
        assert (summary.encoded, summary.refreshed, summary.unchanged) == (0, 8, 8)
        assert "photo metadata refreshed 8" in summary.line()
        assert by_name(old)["a.jpg"]["place"] == "Lisbon"
        again = old.index_folder()
        assert (again.encoded, again.refreshed) == (0, 0)
    with ImageRetrieval(settings) as reopened:
        assert by_name(reopened)["d.heic"]["camera"] == "Apple iPhone 13"
        np.testing.assert_array_equal(reopened.store.vectors(ids), vectors)


def test_an_edited_photo_loses_the_fields_it_no_longer_has(photo_library, settings_for):
    settings = settings_for(photo_library)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        write_photo(photo_library / "trip/a.jpg", 30, make="Apple", model="iPhone 12")  # GPS removed
        engine.index_folder()
        assert "place" not in by_name(engine)["a.jpg"]
    with ImageRetrieval(settings) as reopened:
        edited = by_name(reopened)["a.jpg"]
        assert not {"place", "latitude", "taken"} & set(edited) and edited["camera"] == "Apple iPhone 12"


def test_repl_sort_command_and_cli_flag(photo_library, settings_for, capsys):
    from main import Options, Session, options_from, parse_args

    settings = settings_for(photo_library)
    assert options_from(parse_args(["beach", "--sort=-taken"]), settings).sort == "-taken"
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        session = Session(engine, Options(top_k=3))
        session.handle(":sort newest")
        assert "the order is one of relevance, taken, -taken" in capsys.readouterr().err
        session.handle(":sort -taken")
        assert session.options.sort == "-taken" and "sort=-taken" in session.options.describe()
        capsys.readouterr()
        session.handle("a photo")
        table = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in table[1:4]] == ["trip/e.avif", "trip/c.jpg", "trip/a.jpg"]


def test_embed_images_refreshes_an_old_index_and_says_how_many(photo_library, settings_for):
    from test_indexing import run_embed

    settings = settings_for(photo_library)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        ids = [image_id for image_id, _ in engine.store.items()]
        stale = {key: None for key in ("photo_metadata", *indexer.PHOTO_FIELDS)}
        engine.store.view().collection.update(ids=ids, metadatas=[stale] * len(ids))
    without_mirror(settings)
    done = run_embed(settings)
    assert done.returncode == 0, done.stderr
    assert "unchanged 8, failed 0; photo metadata refreshed 8 (not re-encoded); encoded 0 in" in done.stdout
    with ImageRetrieval(settings) as reopened:
        assert by_name(reopened)["e.avif"]["country"] == "Australia"
