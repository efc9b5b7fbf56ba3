"""Decoding and normalisation of video files: probe (PyAV), DALI (NVDEC / CPU) and PyAV backends."""
from .decoder import BACKENDS, CPU_PREFERENCE, GPU_PREFERENCE, Clip, DecodeOptions, VideoDecoder, parse_preference
from .normalize import BUCKETS, bucket_hw, fit_frames, nearest_bucket, select_frames
from .probe import VideoInfo, probe

__all__ = ["BACKENDS", "BUCKETS", "CPU_PREFERENCE", "GPU_PREFERENCE", "Clip", "DecodeOptions", "VideoDecoder",
           "VideoInfo", "bucket_hw", "fit_frames", "nearest_bucket", "parse_preference", "probe", "select_frames"]
