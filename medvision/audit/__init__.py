"""Audit trail: hash-chained records of every analysis, audit reports, de-identification."""

from medvision.audit.log import AuditLog, Verification
from medvision.audit.records import Auditor, AuditRecord, Pseudonymizer
from medvision.audit.signing import Checkpoint, Signer, Verifier, keygen

__all__ = ["AuditLog", "AuditRecord", "Auditor", "Checkpoint", "Pseudonymizer", "Signer",
           "Verification", "Verifier", "keygen"]
