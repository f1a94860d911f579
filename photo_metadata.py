"""What a photo's EXIF block says: when it was taken, with what camera, and where (with the place name).

Fields (each present only when the file says it; bad values are left out, never guessed):
- `taken`: DateTimeOriginal as the local time the camera recorded, in seconds since 1970 read as UTC,
  so that a date filter (`taken >= 2019-06-01`) compares the calendar date where the photo was taken;
  `taken_offset` ("+01:00") when the camera also wrote OffsetTimeOriginal. Never the file's time.
- `camera` ("Apple iPhone 12": make and model, trimmed, the make not repeated), `lens`,
  `focal_length` (mm), `iso`, `exposure` (seconds).
- `latitude` / `longitude` in degrees; out-of-range values and exactly 0,0 (what a GPS without a fix
  writes) count as absent.
- `place`: the town people would name (PLACE_TIERS: a city of a million within 20 km, else one of
  100,000 within 10 km, else the nearest town of 15,000 within 100 km, so central Lisbon is "Lisbon",
  not its parish, and the open sea is nowhere), with its `region`, `country` (English) and
  `country_code` (ISO 3166-1 alpha-2), from the GeoNames data shipped with `reverse-geocode`, offline.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image

log = logging.getLogger(__name__)

# Stored in each record as `photo_metadata`; a record with an older (or no) version gets its photo
# fields read again from the file on the next indexing run, without re-encoding the image.
PHOTO_METADATA_VERSION = 1
PHOTO_FIELDS = (
    "taken",
    "taken_offset",
    "camera",
    "lens",
    "focal_length",
    "iso",
    "exposure",
    "latitude",
    "longitude",
    "place",
    "region",
    "country",
    "country_code",
)
# (least population, farthest km): the first tier with a town near enough names the place.
PLACE_TIERS = ((1_000_000, 20.0), (100_000, 10.0), (15_000, 100.0))
EARTH_RADIUS_KM = 6371.0

_EXIF_TIME = re.compile(r"^(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2})(?::(\d{2}))?")
_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})$")
_COMPANY_SUFFIX = re.compile(
    r"[\s,]+(corporation|corp\.?|co\.?,?\s*ltd\.?|company|inc\.?|imaging|computer|optical|electronics)\b.*$",
    re.IGNORECASE,
)
_geocoder_lock = threading.Lock()


def read_photo_fields(path: Path) -> dict[str, Any]:
    """The photo fields of an image file, reading only its header and EXIF block; {} when unreadable."""
    from image_io import open_image  # the same format checks as indexing

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(path, math.inf) as image:
                return photo_fields(image.getexif())
    except Exception as error:  # any unreadable file: no photo fields
        log.debug("%s: no photo metadata: %s", path, error)
        return {}


def photo_fields(exif: Image.Exif) -> dict[str, Any]:
    """All photo fields found in an EXIF block; a broken part only loses its own fields."""
    fields: dict[str, Any] = {}
    for part in (_camera_part, _exposure_part, _taken_part, _position_part):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fields |= part(exif)
        except Exception as error:  # malformed EXIF data of any kind
            log.debug("unreadable EXIF (%s): %s", part.__name__.strip("_"), error)
    return fields


def _taken_part(exif: Image.Exif) -> dict[str, Any]:
    details = exif.get_ifd(ExifTags.IFD.Exif)
    moment = parse_exif_time(details.get(ExifTags.Base.DateTimeOriginal))
    if moment is None:
        return {}
    fields: dict[str, Any] = {"taken": moment.replace(tzinfo=UTC).timestamp()}
    offset = parse_offset(details.get(ExifTags.Base.OffsetTimeOriginal))
    if offset:
        fields["taken_offset"] = offset
    return fields


def _camera_part(exif: Image.Exif) -> dict[str, Any]:
    details = exif.get_ifd(ExifTags.IFD.Exif)
    fields = {
        "camera": camera_name(exif.get(ExifTags.Base.Make), exif.get(ExifTags.Base.Model)),
        "lens": clean_text(details.get(ExifTags.Base.LensModel)),
    }
    return {key: value for key, value in fields.items() if value}


def _exposure_part(exif: Image.Exif) -> dict[str, Any]:
    details = exif.get_ifd(ExifTags.IFD.Exif)
    fields = {
        "focal_length": positive_number(details.get(ExifTags.Base.FocalLength)),
        "exposure": positive_number(details.get(ExifTags.Base.ExposureTime), digits=6),
        "iso": iso_speed(details.get(ExifTags.Base.ISOSpeedRatings)),
    }
    return {key: value for key, value in fields.items() if value is not None}


def _position_part(exif: Image.Exif) -> dict[str, Any]:
    position = gps_position(exif.get_ifd(ExifTags.IFD.GPSInfo))
    if position is None:
        return {}
    latitude, longitude = position
    return {"latitude": latitude, "longitude": longitude} | place_fields(latitude, longitude)


def parse_exif_time(value: Any) -> datetime | None:
    """An EXIF time "YYYY:MM:DD HH:MM:SS" as a naive datetime; None for blanks like "0000:00:00"."""
    match = _EXIF_TIME.match(clean_text(value) or "")
    if not match:
        return None
    year, month, day, hour, minute, second = (int(part or 0) for part in match.groups())
    try:
        return datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None


def parse_offset(value: Any) -> str | None:
    """An EXIF UTC offset ("+01:00", "-0530") as "+HH:MM"; None when absent or impossible."""
    match = _OFFSET.match(clean_text(value) or "")
    if not match:
        return None
    sign, hours, minutes = match.groups()
    if int(hours) > 14 or int(minutes) >= 60:
        return None
    return f"{sign}{hours}:{minutes}"


def camera_name(make: Any, model: Any) -> str | None:
    """ "NIKON CORPORATION" + "NIKON D750" -> "Nikon D750"; "Apple" + "iPhone 12" -> "Apple iPhone 12"."""
    make_text = _tidy_make(clean_text(make) or "")
    model_text = clean_text(model) or ""
    if make_text and model_text.lower().startswith(make_text.split()[0].lower()):
        model_text = model_text[len(make_text.split()[0]) :].strip()
    return " ".join(part for part in (make_text, model_text) if part) or None


def _tidy_make(make: str) -> str:
    make = _COMPANY_SUFFIX.sub("", make).strip(" ,.")
    return make.title() if len(make) > 3 and (make.isupper() or make.islower()) else make


def clean_text(value: Any) -> str | None:
    """EXIF text trimmed of padding (NULs, spaces) with inner runs of spaces collapsed."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    text = " ".join(value.replace("\x00", " ").split())
    return text or None


def positive_number(value: Any, digits: int = 3) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return round(number, digits) if math.isfinite(number) and number > 0 else None


def iso_speed(value: Any) -> int | None:
    if isinstance(value, tuple):
        value = value[0] if value else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 10_000_000:
        return None
    return value


def gps_position(gps: dict[int, Any]) -> tuple[float, float] | None:
    """(latitude, longitude) in degrees from a GPS IFD; None when absent, out of range or exactly 0,0."""
    latitude = _degrees(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef), "S")
    longitude = _degrees(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef), "W")
    if latitude is None or longitude is None:
        return None
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180):
        log.debug("GPS position out of range: %s, %s", latitude, longitude)
        return None
    if latitude == 0 and longitude == 0:
        log.debug("GPS position 0,0: taken as no position")
        return None
    return round(latitude, 6), round(longitude, 6)


def _degrees(value: Any, reference: Any, negative: str) -> float | None:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals and its N/S or E/W reference."""
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        return None
    try:
        parts = [float(part) for part in value]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    degrees = sum(part / 60**power for power, part in enumerate(parts))
    if not math.isfinite(degrees) or any(part < 0 for part in parts):
        return None
    return -degrees if (clean_text(reference) or "").upper() == negative else degrees


def place_fields(latitude: float, longitude: float) -> dict[str, Any]:
    """`place`, `region`, `country`, `country_code` of the town named by PLACE_TIERS; {} far from any."""
    nearest = _named_town(latitude, longitude)
    if nearest is None:
        log.debug("%s, %s: no town within %.0f km", latitude, longitude, PLACE_TIERS[-1][1])
        return {}
    fields = {
        "place": nearest.get("city"),
        "region": nearest.get("state"),
        "country": nearest.get("country"),
        "country_code": nearest.get("country_code"),
    }
    return {key: value for key, value in fields.items() if value}


def _named_town(latitude: float, longitude: float) -> dict[str, Any] | None:
    for min_population, max_km in PLACE_TIERS:
        town = _nearest_town(latitude, longitude, min_population)
        if distance_km(latitude, longitude, town["latitude"], town["longitude"]) <= max_km:
            return town
    return None


def _nearest_town(latitude: float, longitude: float, min_population: int) -> dict[str, Any]:
    import reverse_geocode  # loads its GeoNames table (about 0.3 s) on first use only

    with _geocoder_lock:
        return dict(reverse_geocode.get((latitude, longitude), min_population=min_population))


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi, dlam = phi2 - phi1, math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, a)))
