//! The OpenAI-compatible agent configured by the environment (`UNIMIC_OPENAI_BASE_URL`,
//! `UNIMIC_OPENAI_MODEL`, `UNIMIC_OPENAI_API_KEY`), drawing image grids with the shipped
//! tokenizer.

use std::sync::Arc;

use image::RgbImage;
use unimic_agents::openai::{LevelsRenderer, OpenAiAgent, OpenAiConfig, ENV_BASE_URL};
use unimic_agents::Agent;
#[allow(unused_imports)] // the trait's methods, whatever type the shipped tokenizer has
use unimic_codec::tokenizer::ImageTokenizer;
use unimic_transport::TokenGrid;

/// The OpenAI-compatible agent the environment configures, with a name to show; `None` when
/// `UNIMIC_OPENAI_BASE_URL` is not set. A base URL without a model is an error naming the
/// missing variable.
pub fn from_env() -> anyhow::Result<Option<(String, Arc<dyn Agent>)>> {
    if std::env::var_os(ENV_BASE_URL).is_none() {
        return Ok(None);
    }
    let config = OpenAiConfig::from_env()?;
    let tok = Arc::new(crate::models::tokenizer(None)?);
    // Images sent with several quality levels are drawn from all of them.
    let renderer = LevelsRenderer(move |levels: &[TokenGrid]| -> Result<RgbImage, String> {
        tok.decode_levels(levels).map_err(|e| e.to_string())
    });
    let agent = OpenAiAgent::new(config, renderer)?;
    let name = format!("{} at {}", agent.config().model, agent.endpoint());
    Ok(Some((name, Arc::new(agent))))
}
