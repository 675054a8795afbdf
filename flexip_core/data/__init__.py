"""The modality recipe of FlexIP (arXiv 2504.07405): training pairs built from public datasets' own formats and
written as WebDataset shards (flexip_core.training.shards reads them).

- invariant pairs from images with instance masks (the SAM layout): flexip_core.data.sam
- variant pairs from multi-view folders (MVImageNet, CO3D): flexip_core.data.multiview
- variant pairs from videos (OpenVid-1M, CelebV-HQ, ...), decoded with PyAV: flexip_core.data.video
- captions from caption files or a captioning model: flexip_core.data.captions
- the command, the shard writer and the summary: flexip_core.data.build

    python -m flexip_core.data.build --sam DIR --multiview DIR --videos DIR --captioner MODEL --out data/shards
"""
