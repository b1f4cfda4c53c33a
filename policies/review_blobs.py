"""Moved to ``policies.review.blobs`` (the review queue's parts live in ``policies/review/``);
this name keeps working for one release."""

from policies.review.blobs import (
    LEGACY_SCOPE,
    BlobRef,
    BlobStore,
    DatabaseBlobs,
    blob_scope,
    check_sha256,
)

__all__ = ["LEGACY_SCOPE", "BlobRef", "BlobStore", "DatabaseBlobs", "blob_scope", "check_sha256"]
