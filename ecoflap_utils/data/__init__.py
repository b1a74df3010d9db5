"""Calibration and evaluation data: bundled sets (text, images), standard on-disk formats, and CoOp's 11
classification datasets read from their own split files (:mod:`ecoflap_utils.data.coop`)."""
