"""The relay engine (:mod:`.engine`) and the vendor's HTTP API it forwards jobs to (:mod:`.vendor_api`)."""
