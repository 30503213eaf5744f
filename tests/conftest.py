"""Shared fixtures: real data locations and a small synthetic DICOM writer."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false, except in CI, where it is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real public scans); skipped outside CI when absent."""
    require(SHARED_DATA.is_dir(), f"real data folder {SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dcm2niix() -> str:
    """Path to the dcm2niix program (Debian package ``dcm2niix``)."""
    path = shutil.which("dcm2niix")
    require(path is not None, "dcm2niix is not installed (apt-get install dcm2niix)")
    return str(path)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, *,
               poll: float = 0.5) -> None:
    """Poll ``predicate`` until it is true; TimeoutError(``what``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError(what)


def dcmtk_tool(name: str) -> str | None:
    """Path to a dcmtk program (``storescu``, ``echoscu``...), or None when dcmtk is missing.

    pynetdicom installs Python apps with the same names into the virtual environment's bin
    folder; they take other options, so that folder is skipped.
    """
    venv_bin = str(Path(sys.executable).parent)
    search = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                             if p and os.path.realpath(p) != os.path.realpath(venv_bin))
    return shutil.which(name, path=search)


def pydicom_test_files() -> list[Path]:
    """Every file shipped by pydicom's test data and the pydicom-data package (no downloads)."""
    import pydicom

    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    spec = importlib.util.find_spec("data_store")
    if spec is not None and spec.origin is not None:
        roots.append(Path(spec.origin).parent / "data")
    skip = {".py", ".pyc", ".txt", ".md", ".json", ".dump", ".icc"}
    files = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() not in skip and path.name != "README" \
                    and "__pycache__" not in path.parts:
                files.append(path)
    return files


def sr_content(sr: Any) -> dict[str, object]:
    """Concept name -> coded meaning or numeric value of every item of an SR tree."""
    out: dict[str, object] = {}

    def walk(items: object) -> None:
        for item in items or []:  # type: ignore[attr-defined]
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" \
                in item else None
            if name and "ConceptCodeSequence" in item:
                out[name] = item.ConceptCodeSequence[0].CodeMeaning
            elif name and "MeasuredValueSequence" in item:
                out[name] = float(item.MeasuredValueSequence[0].NumericValue)
            walk(item.get("ContentSequence"))

    walk(sr.get("ContentSequence"))
    return out


def tls_certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, made with
    ``cryptography`` (PEM files: ca.crt, server.crt/.key, client.crt/.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("medvision test CA"))
          .issuer_name(name("medvision test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)
    for stem in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        write(stem, key, cert)
    return {n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt",
                                    "client.key")}


def chest_subset(shared_data: Path, root: Path, per_class: int = 8) -> Path:
    """The first ``per_class`` radiographs of each class of the chest training folder, as
    symbolic links in class folders under ``root``."""
    for name in ("NORMAL", "PNEUMONIA"):
        (root / name).mkdir(parents=True)
        for path in sorted((shared_data / "chest_xray" / "train" / name).glob("*.jpeg"))[:per_class]:
            (root / name / path.name).symlink_to(path)
    return root


def hippocampus_subset(shared_data: Path, root: Path, cases: slice) -> Path:
    """Some hippocampus image/label pairs (by sorted name), as symbolic links under ``root``."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
        for path in sorted((shared_data / "hippocampus" / sub).glob("*.nii.gz"))[cases]:
            (root / sub / path.name).symlink_to(path)
    return root


def chest_radiograph(folder: Path) -> tuple[Path, str]:
    """pydicom-data's RG1 (a real CR chest radiograph) as a new study; returns the file and
    its Study Instance UID."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / "chest.dcm"
    ds.save_as(path)
    return path, str(ds.StudyInstanceUID)


def mr_series_from_nifti(nifti: Path, folder: Path) -> list[Path]:
    """A real hippocampus MRI written as a DICOM MR series (one file per axial slice)."""
    import nibabel as nib
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    image = nib.as_closest_canonical(nib.load(nifti))
    data = np.asarray(image.dataobj, dtype=np.float32)
    data = np.round(data / max(float(data.max()), 1.0) * 4000).astype(np.uint16)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine  # RAS -> LPS
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for k in range(data.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study])
        ds.PatientName, ds.PatientID, ds.Modality = "Bridge^Test", "BRIDGE-1", "MR"
        ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20260101", 1, k + 1
        column, row = affine[:3, 0], affine[:3, 1]
        ds.ImageOrientationPatient = [*(column / np.linalg.norm(column)), *(row / np.linalg.norm(row))]
        ds.ImagePositionPatient = list(affine[:3, :3] @ [0, 0, k] + affine[:3, 3])
        ds.PixelSpacing = [float(np.linalg.norm(row)), float(np.linalg.norm(column))]
        ds.SliceThickness = float(np.linalg.norm(affine[:3, 2]))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


SliceWriter = Callable[..., Path]


@pytest.fixture
def write_slice(tmp_path: Path) -> SliceWriter:
    """Write one synthetic single-frame DICOM image and return its path.

    Keyword arguments override geometry and header values; ``pixels`` is ``(rows, columns)``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    counter = iter(range(1_000_000))

    def write(*, pixels: np.ndarray | None = None, series_uid: str = "1.2.3.4.5",
              position: tuple[float, float, float] = (0.0, 0.0, 0.0),
              orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
              spacing: tuple[float, float] = (1.0, 1.0), folder: Path | None = None,
              **attributes: Any) -> Path:
        n = next(counter)
        pixels = np.arange(12, dtype=np.uint16).reshape(3, 4) + n if pixels is None else pixels
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series_uid
        ds.Modality = "MR"
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = 1.0
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        for key, value in attributes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        target = folder or tmp_path / "dicom"
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"slice{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    return write


@pytest.fixture(autouse=True)
def _audit_log_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands under test write their audit log under the test's tmp folder."""
    monkeypatch.setenv("MEDVISION_AUDIT_LOG", str(tmp_path / "audit" / "audit.sqlite"))
    monkeypatch.delenv("MEDVISION_AUDIT_KEY", raising=False)
