"""Audit trail: hash-chained records of every analysis, audit reports, de-identification."""

from medvision.audit.log import AuditLog, Verification
from medvision.audit.records import Auditor, AuditRecord, Pseudonymizer

__all__ = ["AuditLog", "AuditRecord", "Auditor", "Pseudonymizer", "Verification"]
