"""The hospital bridge: DICOM in (C-STORE SCP), analysis, standard DICOM results out."""
