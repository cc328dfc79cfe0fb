"""Tiny random Grounding-DINO and SAM (transformers), saved with save_pretrained into folders, as real ones are."""
import os

import torch

VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "an", "the", "of", "on", "in", "photo"]


def write_tiny_grounding_dino(folder, nouns=(), seed=0, image_side=64):
    """A Grounding-DINO folder (model + processor with a word-level BERT tokenizer knowing ``nouns``)."""
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    os.makedirs(folder, exist_ok=True)
    words = VOCABULARY + sorted({w for noun in nouns for w in noun.lower().split()} - set(VOCABULARY))
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as handle:
        handle.write("\n".join(words) + "\n")
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                          image_size=image_side, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=10, num_feature_levels=3, encoder_n_points=1,
                                 decoder_n_points=1, max_text_len=32, use_timm_backbone=False)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": image_side, "longest_edge": image_side}),
        tokenizer=BertTokenizerFast(vocab_file=vocab_file))
    processor.save_pretrained(folder)
    return str(folder)


def write_tiny_sam(folder, seed=0, image_side=64):
    """A transformers SAM folder (SamModel + SamProcessor) working at ``image_side`` pixels."""
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=16,
                                      output_channels=8, num_pos_feats=4, image_size=image_side, patch_size=16,
                                      global_attn_indexes=[0], window_size=2),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=8, image_size=image_side, patch_size=16,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                                 iou_head_hidden_dim=8))
    torch.manual_seed(seed)
    SamModel(config).eval().save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": image_side},
                                                   pad_size={"height": image_side, "width": image_side})
                 ).save_pretrained(folder)
    return str(folder)
